"""The sandbox: the one pod this agent serves, and the containers in it."""

from __future__ import annotations

import logging
import os
import shutil
import socket

import trio

from agent_proto import agent_pb2, oci_pb2
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    HuskError,
    InvalidArgumentError,
    NotFoundError,
)
from guest.agent import cgroups, oci, spec_version, storage
from guest.agent.config import AgentConfig, check_id
from guest.agent.container import Container, Runtime
from guest.agent.oom import OomWatcher
from guest.agent.process import Process
from guest.agent.reaper import Reaper
from guest.agent.sysctls import PodNetworkSysctls

log = logging.getLogger("husk.agent.sandbox")


class Sandbox:
    """Sandbox-wide state: id, storages, and the containers by id."""

    def __init__(self, config: AgentConfig, reaper: Reaper) -> None:
        self.config = config
        self.rt = Runtime(config, reaper)
        self.id = ""
        self.hostname = ""
        self.created = False
        self.storages: list[str] = []
        self.containers: dict[str, Container] = {}
        #: OOM kills in the containers' cgroups (its ``run`` belongs to the server's nursery)
        self.oom = OomWatcher()
        #: the VM's network is the pod's: its sysctls come with the first container
        self.network_sysctls = PodNetworkSysctls(config.proc_sys, host_mode=config.host_mode)
        self._creating: set[str] = set()
        self._lock = trio.Lock()

    async def create(self, request: agent_pb2.CreateSandboxRequest) -> None:
        """Set hostname and DNS, mount the sandbox's shared storages."""
        async with self._lock:
            if self.created:
                raise AlreadyExistsError(f"sandbox '{self.id}' already exists in this VM")
            if request.hostname:
                self._set_hostname(request.hostname)
            if request.dns:
                self._write_resolv_conf(list(request.dns))
            self.storages = await storage.mount_storages(request.storages, self.config.sysfs)
            for path in (self.config.runc_root, self.config.state_dir / "bundles"):
                path.mkdir(parents=True, exist_ok=True)
            self.id = request.sandbox_id
            self.hostname = request.hostname
            self.created = True
            log.info("sandbox %s created (%d storages)", self.id or "(no id)", len(self.storages))

    def _set_hostname(self, hostname: str) -> None:
        if self.config.host_mode:
            log.info("host mode: not setting the hostname to %s", hostname)
            return
        socket.sethostname(hostname)

    def _write_resolv_conf(self, lines: list[str]) -> None:
        path = self.config.resolv_conf
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".husk-tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, path)

    def require_sandbox(self) -> None:
        """Refuse container calls before CreateSandbox."""
        if not self.created:
            raise FailedPreconditionError("no sandbox in this VM: call CreateSandbox first")

    def container(self, container_id: str) -> Container:
        """Look a container up by id."""
        found = self.containers.get(container_id)
        if found is None:
            raise NotFoundError(f"container '{container_id}' not found")
        return found

    def process(self, container_id: str, exec_id: str) -> Process:
        """Look a process up; ``exec_id`` ``""`` is the init process."""
        return self.container(container_id).find(exec_id)

    async def create_container(self, request: agent_pb2.CreateContainerRequest) -> Container:
        """Check the spec, set the pod network's sysctls, mount storages, ``runc create``."""
        self.require_sandbox()
        cid = check_id("container", request.container_id)
        if cid in self.containers or cid in self._creating:
            raise AlreadyExistsError(f"container '{cid}' already exists")
        if not request.HasField("OCI"):
            raise InvalidArgumentError(f"CreateContainer of '{cid}' carries no OCI spec")
        self._creating.add(cid)
        try:
            version = spec_version.handed_version(
                request.OCI.Version, await self.rt.runc.oci_version_max()
            )
            self.network_sysctls.take(cid, request.OCI.Linux.Sysctl)
            mounts = await storage.mount_storages(request.storages, self.config.sysfs)
            try:
                container = await Container.create(
                    self.rt,
                    request,
                    mounts,
                    oci_version=version,
                    pod_namespaces=self._pod_namespaces(request.OCI),
                )
            except BaseException:
                storage.unmount_all(mounts)
                raise
            self.containers[cid] = container
            self.oom.watch(cid, self.config.cgroup_root / container.cgroups_path.lstrip("/"))
            return container
        finally:
            self._creating.discard(cid)

    def _pod_namespaces(self, spec: oci_pb2.Spec) -> dict[str, str]:
        """The namespaces of a CRI container's pod: its sandbox container's, while it runs."""
        sandbox_id = oci.pod_sandbox_id(spec)
        pause = self.containers.get(sandbox_id) if sandbox_id else None
        if pause is None or pause.init.exited:
            return {}
        return oci.pod_namespace_files(pause.init.pid)

    async def remove_container(self, container_id: str, timeout: float = 0) -> None:
        """Destroy a container (``timeout`` seconds, 0 for no limit) and forget it."""
        container = self.container(container_id)
        self.oom.check(container_id)  # the counter goes away with the cgroup
        with trio.fail_after(timeout) if timeout > 0 else trio.CancelScope():
            failures = await container.destroy()
        self.oom.unwatch(container_id)
        self.containers.pop(container_id, None)
        if failures:
            log.warning("container %s: %s", container_id, "; ".join(failures))

    def stats(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        """cgroup figures of a container."""
        container = self.container(container_id)
        response = agent_pb2.StatsContainerResponse()
        response.cgroup_stats.CopyFrom(
            cgroups.container_stats(self.config.cgroup_root, container.cgroups_path)
        )
        return response

    async def reset(self) -> None:
        """Undo :meth:`create`: no container, storage, cgroup or runtime state is left.

        The agent keeps serving and :meth:`create` may be called again (a pool
        VM that ran a throw-away container is handed to its real sandbox).
        What the sandbox set on the machine itself stays until the next sandbox
        sets it: the hostname, ``resolv.conf`` and the pod network's sysctl values.
        """
        async with self._lock:
            for cid in list(self.containers):
                try:
                    await self.remove_container(cid)
                except Exception:
                    log.exception("removing container %s during the sandbox's reset failed", cid)
                    self.containers.pop(cid, None)
            await self._remove_runtime_leftovers()
            for failure in storage.unmount_all(self.storages):
                log.warning("%s", failure)
            self.storages = []
            cgroups.remove_empty(self.config.cgroup_root, self.config.cgroup_parent)
            self.oom.clear()
            self.network_sysctls = PodNetworkSysctls(
                self.config.proc_sys, host_mode=self.config.host_mode
            )
            self.id = ""
            self.hostname = ""
            self.created = False

    async def _remove_runtime_leftovers(self) -> None:
        """Runtime state and bundles no container owns any more.

        A container whose removal failed leaves them, and :meth:`Container.destroy`
        deletes runc's state only (``state.json``): crun's, the guest's runtime,
        stays. Each is deleted with ``--force`` (which also kills what is left in
        it) before its directory goes.
        """
        for root in (self.config.runc_root, self.config.state_dir / "bundles"):
            try:
                entries = sorted(root.iterdir())
            except FileNotFoundError:
                continue
            for entry in entries:
                if root == self.config.runc_root and entry.is_dir():
                    try:
                        await self.rt.runc.delete(entry.name, force=True)
                    except (HuskError, OSError) as exc:
                        log.warning("leftover runtime state of %s: %s", entry.name, exc)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    async def destroy(self) -> None:
        """Remove every container, unmount the sandbox's storages, flush disks."""
        sandbox_id = self.id
        await self.reset()
        os.sync()
        log.info("sandbox %s destroyed", sandbox_id or "(no id)")
