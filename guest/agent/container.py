"""One container: its bundle, its init process and exec'd processes, driven by runc."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from agent_proto import agent_pb2, oci_pb2
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from guest.agent import oci, readonly, storage
from guest.agent.config import AgentConfig, check_id
from guest.agent.console import ConsoleSocket
from guest.agent.process import Process, ProcessIO, process_label
from guest.agent.reaper import Reaper
from guest.agent.runc import Runc, RuncError, read_pid, remove_quietly

log = logging.getLogger("husk.agent.container")

CONSOLE_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0
EXEC_TIMEOUT = 2.0
_console_ids = itertools.count(1)

RuncLaunch = Callable[[Sequence[int | None], str | None], Awaitable[None]]


class Runtime:
    """What every container needs: config, reaper and runc."""

    def __init__(self, config: AgentConfig, reaper: Reaper) -> None:
        self.config = config
        self.reaper = reaper
        self.runc = Runc(reaper, config.runc, config.runc_root)


async def _receive_console(console: ConsoleSocket, out: list[int]) -> None:
    with trio.fail_after(CONSOLE_TIMEOUT):
        out.append(await console.receive_master())


async def launch(
    rt: Runtime, label: str, terminal: bool, pid_file: Path, run: RuncLaunch
) -> tuple[ProcessIO, int]:
    """Run ``runc create``/``exec`` with fresh stdio; return the IO and the process's pid.

    With a terminal the pty master comes over a console socket while runc runs.
    """
    remove_quietly(pid_file)
    if terminal:
        rt.config.console_dir.mkdir(parents=True, exist_ok=True)
        path = str(rt.config.console_dir / f"{next(_console_ids)}.sock")
        masters: list[int] = []
        async with ConsoleSocket(path) as console, trio.open_nursery() as nursery:
            nursery.start_soon(_receive_console, console, masters)
            try:
                await run((None, None, None), path)
            except BaseException:
                nursery.cancel_scope.cancel()
                for fd in masters:
                    os.close(fd)
                raise
        io = ProcessIO.with_terminal(label, masters[0])
    else:
        io, child_fds = ProcessIO.with_pipes(label)
        try:
            await run(child_fds, None)
        except BaseException:
            await io.aclose()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
    try:
        return io, read_pid(pid_file)
    except (OSError, RuncError):
        await io.aclose()
        raise


def resolve_root(config: AgentConfig, container_id: str, root: oci_pb2.Root) -> Path:
    """Where the container's rootfs is in the guest (see :mod:`guest.agent.config`)."""
    path = Path(root.Path) if root.Path else Path("rootfs")
    if not path.is_absolute():
        path = config.shared_dir / container_id / path
    if not path.is_dir():
        raise NotFoundError(f"rootfs of container '{container_id}' not found at {path}")
    return path


def signal_handled(pid: int, signum: int) -> bool:
    """Whether ``pid`` catches ``signum`` (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


async def _keep_readonly_flags(rt: Runtime, cid: str, pid: int, paths: list[str]) -> None:
    """crun drops nosuid/nodev/noexec from read-only paths; put them back (see ``readonly``)."""
    if not paths or os.path.basename(rt.runc.binary) != "crun":
        return
    status = await readonly.keep_mount_flags(rt.reaper, pid, paths)
    if status != 0:
        log.warning("container %s: read-only paths keep crun's flags (status %d)", cid, status)


class Container:
    """A container created by runc, with its processes and the mounts made for it."""

    def __init__(
        self,
        rt: Runtime,
        container_id: str,
        bundle: Path,
        init: Process,
        mounts: list[str],
    ) -> None:
        self.rt = rt
        self.id = container_id
        self.bundle = bundle
        self.init = init
        self.execs: dict[str, Process] = {}
        self.mounts = mounts
        self.cgroups_path = rt.config.cgroups_path(container_id)
        self.lock = trio.Lock()
        self._status = "created"

    @property
    def status(self) -> str:
        """``created``, ``running``, ``paused`` or ``stopped``."""
        return "stopped" if self.init.exited else self._status

    @classmethod
    async def create(
        cls,
        rt: Runtime,
        request: agent_pb2.CreateContainerRequest,
        mounts: list[str],
        *,
        oci_version: str,
        pod_namespaces: dict[str, str] | None = None,
    ) -> Container:
        """Write the bundle and ``runc create`` the container (its init waits for start).

        ``oci_version`` is the runtime-spec version the runtime is handed;
        ``pod_namespaces``: the guest files of its pod's namespaces (see ``oci``).
        """
        cid = request.container_id
        spec = request.OCI
        exec_id = request.exec_id or cid
        root = resolve_root(rt.config, cid, spec.Root)
        config = oci.runc_config(
            spec,
            root_path=str(root),
            cgroups_path=rt.config.cgroups_path(cid),
            oci_version=oci_version,
            pod_namespaces=pod_namespaces,
        )
        bundle = rt.config.bundle_dir(cid)
        if bundle.exists():
            shutil.rmtree(bundle)
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        terminal = bool(config["process"]["terminal"])
        pid_file = bundle / "init.pid"
        label = process_label(cid, exec_id, True)

        async def run(stdio: Sequence[int | None], console: str | None) -> None:
            await rt.runc.create(cid, bundle, pid_file, stdio, console)

        since = rt.reaper.generation
        try:
            io, pid = await launch(rt, label, terminal, pid_file, run)
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        watch = rt.reaper.adopt(pid, since)
        init = Process(cid, exec_id, pid, io, watch, init=True)
        await _keep_readonly_flags(rt, cid, pid, config["linux"].get("readonlyPaths", []))
        log.info("created container %s (init pid %d)", cid, pid)
        return cls(rt, cid, bundle, init, mounts)

    async def start(self) -> None:
        """``runc start``."""
        async with self.lock:
            if self.status != "created":
                raise FailedPreconditionError(
                    f"container '{self.id}' is {self.status}, not created: it cannot be started"
                )
            before = _exe(self.init.pid)
            await self.rt.runc.start(self.id)
            self._status = "running"
            await self._until_exec(before)

    async def _until_exec(self, runc_exe: str | None) -> None:
        """Wait (briefly) until ``runc init`` has exec'd the container's program.

        ``runc start`` returns before that; a signal sent in between would reach
        runc's Go runtime, which handles every signal, instead of the program.
        """
        with trio.move_on_after(EXEC_TIMEOUT):
            while not self.init.exited and _exe(self.init.pid) == runc_exe:
                await trio.sleep(0.005)

    async def exec(self, request: agent_pb2.ExecProcessRequest) -> Process:
        """``runc exec --detach`` one more process with its own stdio."""
        exec_id = check_id("exec", request.exec_id)
        if not request.HasField("process"):
            raise InvalidArgumentError(f"ExecProcess '{exec_id}' in '{self.id}' has no process")
        async with self.lock:
            if exec_id in self.execs or exec_id == self.init.exec_id:
                raise AlreadyExistsError(
                    f"process '{exec_id}' already exists in container '{self.id}'"
                )
            if self.status != "running":
                raise FailedPreconditionError(
                    f"container '{self.id}' is {self.status}: cannot exec '{exec_id}' in it"
                )
            process_json = oci.process_config(request.process)
            process_file = self.bundle / f"exec-{exec_id}.json"
            process_file.write_text(json.dumps(process_json))
            pid_file = self.bundle / f"exec-{exec_id}.pid"
            label = process_label(self.id, exec_id, False)

            async def run(stdio: Sequence[int | None], console: str | None) -> None:
                await self.rt.runc.exec(
                    self.id,
                    self.bundle,
                    process_file,
                    pid_file,
                    stdio,
                    console,
                    oom_score_adj=int(process_json["oomScoreAdj"]),
                )

            since = self.rt.reaper.generation
            io, pid = await launch(self.rt, label, bool(process_json["terminal"]), pid_file, run)
            process = Process(self.id, exec_id, pid, io, self.rt.reaper.adopt(pid, since), False)
            self.execs[exec_id] = process
            log.info("exec %s in %s: pid %d", exec_id, self.id, pid)
            return process

    def find(self, exec_id: str) -> Process:
        """The init process for ``""`` or its exec id, else the exec'd process."""
        if not exec_id or exec_id == self.init.exec_id:
            return self.init
        process = self.execs.get(exec_id)
        if process is None:
            raise NotFoundError(f"process '{exec_id}' not found in container '{self.id}'")
        return process

    async def prune(self, process: Process) -> None:
        """Forget an exec'd process once it was waited for and its output drained."""
        if process.init or not (process.waited and process.io.drained):
            return
        if self.execs.get(process.exec_id) is process:
            del self.execs[process.exec_id]
            await process.io.aclose()
            for suffix in ("json", "pid"):
                remove_quietly(self.bundle / f"exec-{process.exec_id}.{suffix}")

    async def signal(self, exec_id: str, signum: int) -> None:
        """Signal one process; ``""`` with SIGKILL signals every process (as Kata reads it)."""
        if not exec_id and signum == signal.SIGKILL:
            if not self.init.exited:
                await self._runc_kill(signum, all_processes=True)
            return
        process = self.find(exec_id)
        if not process.init:
            process.signal(signum)
            return
        if signum == signal.SIGTERM and not signal_handled(process.pid, signum):
            # A pid-namespace init ignores signals it has no handler for.
            signum = signal.SIGKILL
        if not process.exited:
            await self._runc_kill(signum)

    async def _runc_kill(self, signum: int, *, all_processes: bool = False) -> None:
        try:
            await self.rt.runc.kill(self.id, signum, all_processes=all_processes)
        except RuncError:
            # The init may exit between the check and runc's own check.
            await trio.sleep(0.05)
            self.rt.reaper.sweep()
            if not self.init.exited:
                raise

    async def pause(self) -> None:
        """``runc pause`` (cgroup freezer)."""
        async with self.lock:
            if self.status != "running":
                raise FailedPreconditionError(
                    f"container '{self.id}' is {self.status}, not running: it cannot be paused"
                )
            await self.rt.runc.pause(self.id)
            self._status = "paused"

    async def resume(self) -> None:
        """``runc resume``."""
        async with self.lock:
            if self.status != "paused":
                raise FailedPreconditionError(
                    f"container '{self.id}' is {self.status}, not paused: it cannot be resumed"
                )
            await self.rt.runc.resume(self.id)
            self._status = "running"

    async def update(self, resources: oci_pb2.LinuxResources) -> None:
        """``runc update`` with new cgroup limits."""
        async with self.lock:
            if self.status == "stopped":
                raise FailedPreconditionError(f"container '{self.id}' is stopped")
            await self.rt.runc.update(self.id, oci.resources_config(resources))

    async def destroy(self) -> list[str]:
        """Kill every process, delete runc's state, close stdio, unmount, remove the bundle.

        Returns the unmount failures (the container is gone either way).
        """
        async with self.lock:
            if self._status == "paused" and not self.init.exited:
                with contextlib.suppress(RuncError):
                    await self.rt.runc.resume(self.id)
            if self.rt.runc.exists(self.id):
                try:
                    await self.rt.runc.delete(self.id, force=True)
                except RuncError as e:
                    # its processes are killed below either way: the container still goes
                    log.warning("container %s: %s", self.id, e)
            for process in [self.init, *self.execs.values()]:
                process.signal(signal.SIGKILL)
            with trio.move_on_after(EXIT_TIMEOUT) as scope:
                for process in [self.init, *self.execs.values()]:
                    await process.wait()
            if scope.cancelled_caught:
                log.warning("processes of container %s did not exit in time", self.id)
            for process in [self.init, *self.execs.values()]:
                await process.io.aclose()
                self.rt.reaper.forget(process.pid)
            self.execs.clear()
            failures = storage.unmount_all(self.mounts)
            shutil.rmtree(self.bundle, ignore_errors=True)
            self._status = "stopped"
            log.info("removed container %s", self.id)
            return failures
