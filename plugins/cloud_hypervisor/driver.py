"""``CloudHypervisor``: one sandbox VM in one ``cloud-hypervisor`` process, driven over REST.

The life, in Cloud Hypervisor's terms: ``prepare`` makes the VM's directory;
``start`` runs a virtiofsd per virtio-fs share, then ``cloud-hypervisor
--api-socket path=… --event-monitor fd=…``, waits for ``vmm.ping`` to answer,
sends ``vm.create`` (kernel, initramfs, cmdline, vCPUs, memory with its
virtio-mem room, serial console socket, hybrid-vsock socket, disks, shares),
adds each NIC with its tap fds (``vm.add-net``: the fds ride on the request as
``SCM_RIGHTS``, which ``vm.create`` does not take) and sends ``vm.boot``.
Hot-plug is ``vm.add-disk``/``vm.add-net``/``vm.add-fs`` and
``vm.remove-device``; ``resize`` is ``vm.resize``; ``size`` and ``state`` read
``vm.info``. ``stop`` asks for ``vm.shutdown``, ``vm.delete`` and
``vmm.shutdown``, then escalates to SIGTERM and SIGKILL.

The process, its API and its event monitor are ``vmm.Vmm``; this module is
the VM: its spec, devices and size. No nursery of its own, like the QEMU
driver: each request opens its own connection (``api.ApiClient``), process
liveness is ``trio.Process.wait``, and the event monitor is read by whoever
waits for the VM's end (``wait``).

Templates are not offered (``capabilities().templates`` is False). Cloud
Hypervisor's ``vm.snapshot``/``vm.restore`` can make copy-on-write clones, as
Kata's runtime-rs does: the template's RAM is a shared, file-backed memory
zone that the snapshot leaves out, and each clone is restored with the zone's
``shared`` patched to false, so it maps the file privately. That fits only
sandboxes without virtio-fs (vhost-user needs shared RAM: Kata refuses a
shared fs there too), and the snapshot is a directory whose ``config.json``
names the template's own sockets (vsock, console), which every clone would
need rewritten; husk's template is one RAM file and one state file. Not done.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from common.channel_auth import read_secret, write_secret
from plugins.cloud_hypervisor import virtiofsd
from plugins.cloud_hypervisor.api import ApiClient, ApiError
from plugins.cloud_hypervisor.plugin import kvm_problem
from plugins.cloud_hypervisor.process import HelperProcess
from plugins.cloud_hypervisor.vmconfig import (
    MIB,
    ChSettings,
    VmPaths,
    disk_config,
    fs_config,
    hotplug_memory_mib,
    net_config,
    resize_body,
    round_memory_mib,
    vm_config,
)
from plugins.cloud_hypervisor.vmm import NAME, Vmm
from shim.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    HostError,
    HypervisorError,
    InvalidArgumentError,
    NotSupportedError,
)
from shim.host import HostFacts
from shim.hypervisor import (
    UNIX_PATH_MAX,
    AgentEndpoint,
    BlockDevice,
    Capabilities,
    Device,
    HybridVsockEndpoint,
    Hypervisor,
    NetDevice,
    SharedFsDevice,
    VmSize,
    VmSpec,
    VmState,
)
from shim.resources import DIR, FILE, PROCESS, SOCKET_FILE, Resource, process_start_time

log = logging.getLogger("husk.plugins.cloud_hypervisor")

AGENT_VSOCK_PORT = 1024
#: Kata's debug console port, on the guest's vsock
DEBUG_CONSOLE_VSOCK_PORT = 1026
#: seconds the guest has to release a hot-removed device
REMOVE_TIMEOUT = 30.0
#: seconds the guest has to plug hot-added memory
PLUG_TIMEOUT = 30.0
#: seconds to wait for the guest to give memory back before reporting what it kept
UNPLUG_WAIT = 10.0
_POLL = 0.05

_STATES = {
    "Running": VmState.RUNNING,
    "Paused": VmState.PAUSED,
    "BreakPoint": VmState.PAUSED,
    "Shutdown": VmState.STOPPED,
}

T = TypeVar("T")


class CloudHypervisor(Hypervisor):
    """A sandbox VM in Cloud Hypervisor (KVM only), over its REST API."""

    name = "cloud-hypervisor"

    def __init__(self, section: Mapping[str, Any], host: HostFacts | None = None) -> None:
        self.settings = ChSettings.from_section(section)
        self._host = host if host is not None else HostFacts.probe()
        self._spec: VmSpec | None = None
        self._paths: VmPaths | None = None
        self._vmm: Vmm | None = None
        self._virtiofsd: dict[str, HelperProcess] = {}
        #: attached devices (cold- and hot-plugged) and, once hot-plugged, their PCI address
        self._devices: dict[str, Device] = {}
        self.bdf: dict[str, str] = {}
        self._booted = False
        self._lock = trio.Lock()

    # --- description ----------------------------------------------------------

    def capabilities(self) -> Capabilities:
        """What this driver does: PCI hot-plug of disks, NICs and virtio-fs shares, vCPUs
        in and out through ACPI, memory through virtio-mem; hybrid vsock; no templates."""
        return Capabilities(
            block_hotplug=True,
            net_hotplug=True,
            hybrid_vsock=True,
            shared_fs=frozenset({"virtio-fs"}),
            cpu_hotplug=True,
            vcpu_unplug=True,
            memory_hotplug=True,
            memory_unplug=True,
            templates=False,
        )

    def agent_endpoint(self) -> AgentEndpoint:
        paths = self._require_paths()
        return HybridVsockEndpoint(paths.vsock, AGENT_VSOCK_PORT, paths.agent_secret)

    def debug_console_endpoint(self) -> AgentEndpoint | None:
        spec = self._spec
        if spec is None or not spec.debug_console:
            return None
        paths = self._require_paths()
        return HybridVsockEndpoint(paths.vsock, DEBUG_CONSOLE_VSOCK_PORT, paths.agent_secret)

    def console_socket(self) -> Path | None:
        return self._require_paths().console

    @property
    def paths(self) -> VmPaths:
        """The VM's files (after ``prepare``)."""
        return self._require_paths()

    def vmm_pid(self) -> int | None:
        vmm = self._vmm
        return vmm.pid if vmm is not None and vmm.alive else None

    # --- life -------------------------------------------------------------------

    async def prepare(self, spec: VmSpec) -> None:
        self._check_spec(spec)
        self._check_host(spec)
        paths = VmPaths(spec.state_dir / "cloud-hypervisor")
        for sock in [*paths.sockets(), *(paths.virtiofs(s.id) for s in _shares(spec))]:
            if len(str(sock).encode()) > UNIX_PATH_MAX:
                raise InvalidArgumentError(
                    f"sandbox {spec.sandbox_id}: socket path {sock} is longer than "
                    f"{UNIX_PATH_MAX} bytes; use a shorter state_dir in [runtime]"
                )
        self._spec, self._paths = spec, paths
        spec.record(Resource(DIR, path=str(paths.dir)))
        for sock in paths.sockets():
            spec.record(Resource(SOCKET_FILE, path=str(sock)))
        spec.record(Resource(FILE, path=str(paths.log)))
        spec.record(Resource(FILE, path=str(paths.agent_secret)))
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        paths.dir.mkdir(mode=0o700, exist_ok=True)
        # before the VMM starts; every hybrid-vsock peer of the guest must prove it
        write_secret(paths.agent_secret)
        for device in spec.devices:
            self._devices[device.id] = device

    def _check_spec(self, spec: VmSpec) -> None:
        if spec.agent_transport not in ("auto", "hybrid-vsock"):
            raise NotSupportedError(
                self.name,
                f"agent transport {spec.agent_transport}",
                'Cloud Hypervisor offers hybrid vsock only; use transport = "auto"',
            )
        if spec.template is not None:
            raise NotSupportedError(
                self.name, "VM templates", "snapshot/restore clones are not implemented for it"
            )
        for device in [*([spec.shared_fs] if spec.shared_fs else []), *spec.devices]:
            _check_device(self.name, device, "a boot device")

    def _check_host(self, spec: VmSpec) -> None:
        """The host has what this VM needs; one line naming what is missing."""
        binary = Path(self.settings.binary)
        if not binary.is_file():
            raise HostError(
                f"cloud-hypervisor binary {binary} not found "
                "(key 'path' of [hypervisor.cloud-hypervisor])"
            )
        problem = kvm_problem(self._host)
        if problem is not None:
            raise HostError(problem)
        for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
            if path is not None and not path.is_file():
                raise HostError(f"guest {what} {path} not found (run `husk image build`)")
        if _shares(spec) and not Path(self.settings.virtiofsd).is_file():
            raise HostError(
                f"virtiofsd binary {self.settings.virtiofsd} not found "
                "(key 'virtiofsd' of [hypervisor.cloud-hypervisor])"
            )

    async def start(self, timeout: float) -> None:
        spec = self._require_spec()
        async with self._lock:
            if self._vmm is not None and self._vmm.alive:
                raise FailedPreconditionError(
                    f"sandbox {spec.sandbox_id}: the VM is already running"
                )
            deadline = trio.current_time() + timeout
            try:
                for share in _shares(spec):
                    await self._start_virtiofsd(share, max(deadline - trio.current_time(), 0))
                vmm = await Vmm.spawn(self.settings, self._require_paths())
                self._vmm, self._booted = vmm, False
                # after the spawn (the pid is new); a crash in between is covered by
                # cleanup, which also kills every process whose command line names the
                # state dir
                spec.record(
                    Resource(PROCESS, pid=vmm.pid, start=process_start_time(vmm.pid), name=NAME)
                )
                await vmm.wait_api(deadline, timeout)
                await self._create_and_boot(deadline, timeout)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._kill_all()
                raise
        log.debug("sandbox %s: cloud-hypervisor %s booted", spec.sandbox_id, self.version)

    @property
    def version(self) -> str:
        """Cloud Hypervisor's version, once it answered ``vmm.ping``."""
        return self._vmm.version if self._vmm is not None else ""

    async def _create_and_boot(self, deadline: float, timeout: float) -> None:
        spec, paths = self._require_spec(), self._require_paths()
        devices = list(self._devices.values())
        disks = [d for d in devices if isinstance(d, BlockDevice)]
        nics = [d for d in devices if isinstance(d, NetDevice)]
        secret = read_secret(paths.agent_secret)
        body = vm_config(spec, self.settings, paths, disks, _shares(spec), secret)
        try:
            with trio.fail_at(deadline):
                await self._call(lambda api: api.put("vm.create", body))
                for nic in nics:
                    await self._call(partial(_add, device=nic, paths=paths))
                await self._call(lambda api: api.put("vm.boot"))
        except trio.TooSlowError:
            raise DeadlineExceededError(
                f"cloud-hypervisor did not create and boot sandbox {spec.sandbox_id}'s VM "
                f"within {timeout:g} s; killed it (see {paths.log})"
            ) from None
        self._booted = True

    async def _start_virtiofsd(self, share: SharedFsDevice, timeout: float) -> None:
        spec, paths = self._require_spec(), self._require_paths()
        sock, out = paths.virtiofs(share.id), paths.virtiofsd_log(share.id)
        spec.record(Resource(SOCKET_FILE, path=str(sock)))
        spec.record(Resource(FILE, path=str(out)))
        process = await virtiofsd.start(self.settings.virtiofsd, share, sock, out, timeout)
        self._virtiofsd[share.id] = process
        spec.record(
            Resource(
                PROCESS, pid=process.pid, start=process_start_time(process.pid), name="virtiofsd"
            )
        )

    async def _kill_all(self) -> None:
        """After a failed start: no VMM, no virtiofsd, no sockets left."""
        if self._vmm is not None:
            await self._vmm.kill()
        for process in self._virtiofsd.values():
            await process.kill()
        self._virtiofsd.clear()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        paths = self._require_paths()
        for sock in [*paths.sockets(), *(paths.virtiofs(i) for i in self._devices)]:
            sock.unlink(missing_ok=True)
        spec = self._spec
        if spec is not None and spec.shared_fs is not None:
            paths.virtiofs(spec.shared_fs.id).unlink(missing_ok=True)

    async def stop(self) -> None:
        vmm = self._vmm
        if vmm is not None and vmm.alive:
            step = self.settings.stop_timeout
            await vmm.shut_down(step, await self._running(step))
        for helper in self._virtiofsd.values():
            await helper.terminate(self.settings.stop_timeout)
        self._virtiofsd.clear()
        if self._paths is not None:
            self._remove_sockets()

    async def _running(self, step: float) -> bool | None:
        """Whether a VM is booted (running or paused); None: the VMM does not answer."""
        with trio.move_on_after(step):
            try:
                return await self.state() in (VmState.RUNNING, VmState.PAUSED)
            except (HypervisorError, DeadlineExceededError):
                return None
        return None

    async def destroy(self) -> None:
        if self._paths is None:
            return
        with trio.CancelScope(shield=True):
            await self.stop()
            if self._vmm is not None:
                await self._vmm.aclose()
        shutil.rmtree(self._paths.dir, ignore_errors=True)

    async def wait(self) -> int | None:
        """Return once the VM is gone: the VMM exited (its status), or the event monitor
        reported a guest panic or reboot while the VMM lives on (None)."""
        vmm = self._vmm
        if vmm is None:
            return None
        status = await vmm.wait()
        if vmm.lost is not None and vmm.alive:
            log.warning(
                "sandbox %s: the VM is gone (%s)",
                self._require_spec().sandbox_id,
                vmm.lost.describe(),
            )
        return status

    async def state(self) -> VmState:
        vmm = self._vmm
        if vmm is None:
            return VmState.NOT_STARTED
        if not vmm.alive or vmm.lost is not None:
            return VmState.STOPPED
        try:
            info = await self._call(lambda api: api.get("vm.info"))
        except ApiError as exc:
            if exc.status != 404:
                raise
            return VmState.STOPPED if self._booted else VmState.NOT_STARTED
        except HypervisorError:
            if not vmm.alive:
                return VmState.STOPPED
            raise
        status = str(info.get("state", "")) if isinstance(info, dict) else ""
        if status == "Created":
            # after vm.shutdown Cloud Hypervisor reports the VM as created again
            return VmState.STOPPED if self._booted else VmState.NOT_STARTED
        return _STATES.get(status, VmState.PAUSED)

    # --- devices ----------------------------------------------------------------

    async def add_device(self, device: Device) -> None:
        _check_device(self.name, device, "a hot-plugged device")
        async with self._lock:
            if device.id in self._devices:
                raise FailedPreconditionError(f"device {device.id} is already attached")
            if isinstance(device, SharedFsDevice):
                await self._start_virtiofsd(device, self.settings.boot_timeout)
            try:
                answer = await self._call(lambda api: _add(api, device, self._require_paths()))
            except BaseException:
                helper = self._virtiofsd.pop(device.id, None)
                if helper is not None:
                    with trio.CancelScope(shield=True):
                        await helper.kill()
                    self._require_paths().virtiofs(device.id).unlink(missing_ok=True)
                raise
            self._devices[device.id] = device
            if isinstance(answer, dict) and "bdf" in answer:
                self.bdf[device.id] = str(answer["bdf"])

    async def remove_device(self, device: Device) -> None:
        async with self._lock:
            if device.id not in self._devices:
                raise FailedPreconditionError(f"device {device.id} is not attached")
            await self._call(lambda api: api.put("vm.remove-device", {"id": device.id}))
            await self._wait_released(device.id)
            self._devices.pop(device.id, None)
            self.bdf.pop(device.id, None)
            helper = self._virtiofsd.pop(device.id, None)
            if helper is not None:
                await helper.terminate(self.settings.stop_timeout)
                self._require_paths().virtiofs(device.id).unlink(missing_ok=True)

    async def _wait_released(self, device_id: str) -> None:
        """Cloud Hypervisor drops a device from ``vm.info``'s tree once the guest ejected it."""
        with trio.move_on_after(REMOVE_TIMEOUT):
            while True:
                info = await self._call(lambda api: api.get("vm.info"))
                tree = info.get("device_tree") if isinstance(info, dict) else None
                if not isinstance(tree, dict) or device_id not in tree:
                    return
                await trio.sleep(_POLL)
        raise DeadlineExceededError(
            f"cloud-hypervisor: the guest did not release device {device_id} "
            f"within {REMOVE_TIMEOUT:g} s"
        )

    @property
    def devices(self) -> Sequence[Device]:
        """The devices the VM has (cold- and hot-plugged)."""
        return list(self._devices.values())

    # --- vCPUs and memory ---------------------------------------------------------

    async def resize(self, vcpus: int, memory_mib: int) -> VmSize:
        spec = self._require_spec()
        maximum = self._maximum()
        VmSize(vcpus, memory_mib).check_within(maximum, "cloud-hypervisor", spec.sandbox_id)
        want = VmSize(
            max(vcpus, spec.vcpus),
            min(max(round_memory_mib(memory_mib), spec.memory_mib), maximum.memory_mib),
        )
        async with self._lock:
            before = await self.size()
            body = resize_body(want.vcpus, want.memory_mib)
            if maximum.memory_mib == spec.memory_mib:
                del body["desired_ram"]  # no virtio-mem region: leave memory alone
            await self._resize(body)
            if want.memory_mib > before.memory_mib:
                return await self._settle(want, PLUG_TIMEOUT, must_reach=True)
            if want.memory_mib < before.memory_mib:
                return await self._settle(want, UNPLUG_WAIT, must_reach=False)
            return await self.size()

    async def _resize(self, body: dict[str, Any]) -> None:
        """``vm.resize``; a 429 means a vCPU removal is still pending: try again shortly."""
        with trio.move_on_after(REMOVE_TIMEOUT):
            while True:
                try:
                    await self._call(lambda api: api.put("vm.resize", body))
                    return
                except ApiError as exc:
                    if exc.status != 429:
                        raise
                await trio.sleep(_POLL)
        raise DeadlineExceededError(
            f"cloud-hypervisor: a vCPU removal was still pending after {REMOVE_TIMEOUT:g} s"
        )

    async def _settle(self, want: VmSize, wait: float, *, must_reach: bool) -> VmSize:
        """Poll the size until the guest has plugged (or unplugged) what was asked."""
        size = await self.size()
        with trio.move_on_after(wait):
            while size.memory_mib != want.memory_mib:
                await trio.sleep(_POLL)
                size = await self.size()
        if must_reach and size.memory_mib < want.memory_mib:
            raise DeadlineExceededError(
                f"cloud-hypervisor: the guest plugged {size.memory_mib} of {want.memory_mib} MiB "
                f"within {wait:g} s"
            )
        return size

    async def size(self) -> VmSize:
        spec = self._require_spec()
        info = await self._call(lambda api: api.get("vm.info"))
        try:
            vcpus = int(info["config"]["cpus"]["boot_vcpus"])
            memory = int(info.get("memory_actual_size", spec.memory_mib * MIB)) // MIB
        except (KeyError, TypeError, ValueError):
            raise HypervisorError("cloud-hypervisor: vm.info has no vCPU count") from None
        return VmSize(vcpus, memory)

    def _maximum(self) -> VmSize:
        """What the VM was started with room for (virtio-mem's room is whole regions)."""
        spec = self._require_spec()
        return VmSize(spec.maximum.vcpus, spec.memory_mib + hotplug_memory_mib(spec))

    async def counters(self) -> dict[str, dict[str, int]]:
        """Cloud Hypervisor's per-device counters (``vm.counters``), for diagnostics."""
        answer = await self._call(lambda api: api.get("vm.counters"))
        return answer if isinstance(answer, dict) else {}

    # --- internals ----------------------------------------------------------------

    async def _call(self, request: Callable[[ApiClient], Awaitable[T]]) -> T:
        return await self._require_vmm().call(request)

    def _require_spec(self) -> VmSpec:
        if self._spec is None:
            raise FailedPreconditionError("cloud-hypervisor: prepare() was not called")
        return self._spec

    def _require_paths(self) -> VmPaths:
        if self._paths is None:
            raise FailedPreconditionError("cloud-hypervisor: prepare() was not called")
        return self._paths

    def _require_vmm(self) -> Vmm:
        if self._vmm is None:
            raise FailedPreconditionError("cloud-hypervisor: the VM is not started")
        return self._vmm


def _shares(spec: VmSpec) -> list[SharedFsDevice]:
    """The virtio-fs shares the VM boots with: the sandbox's, then any in ``devices``."""
    shares = [spec.shared_fs] if spec.shared_fs is not None else []
    return shares + [d for d in spec.devices if isinstance(d, SharedFsDevice)]


def _check_device(plugin: str, device: Device, what: str) -> None:
    if isinstance(device, SharedFsDevice) and device.kind != "virtio-fs":
        raise NotSupportedError(
            plugin, f"a {device.kind} share", 'Cloud Hypervisor has no 9p; use "virtio-fs"'
        )
    if isinstance(device, BlockDevice) and device.format not in ("raw", "qcow2"):
        raise NotSupportedError(plugin, f"disk format {device.format}", "raw or qcow2 only")
    if not isinstance(device, BlockDevice | NetDevice | SharedFsDevice):
        raise NotSupportedError(
            plugin,
            f"{type(device).__name__} as {what}",
            "the VM's one vsock device is its hybrid-vsock socket",
        )


async def _add(api: ApiClient, device: Device, paths: VmPaths) -> Any:
    if isinstance(device, BlockDevice):
        return await api.put("vm.add-disk", disk_config(device))
    if isinstance(device, NetDevice):
        return await api.put("vm.add-net", net_config(device), device.tap_fds)
    assert isinstance(device, SharedFsDevice)
    return await api.put("vm.add-fs", fs_config(device, paths.virtiofs(device.id)))
