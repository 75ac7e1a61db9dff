"""``QemuHypervisor``: one sandbox VM in one QEMU process, driven over QMP.

Concurrency without a nursery of its own: every operation opens its own QMP
connection (greeting, ``qmp_capabilities``, commands, events) inside an
``open_qmp`` block whose reader task lives exactly as long as the operation,
and a lock makes operations take turns on QEMU's single monitor. Process
liveness needs no watcher task either: ``trio.Process.wait`` can be awaited by
any number of tasks (``wait()`` below), and the QMP socket reaches EOF when
QEMU dies, which every operation turns into ``VmmExitedError`` with QEMU's
last stderr lines. So the ``Hypervisor`` interface needs no nursery parameter.

The QMP socket is made by the driver (bound and listening before QEMU starts,
passed as an fd): the connection is queued at once and QEMU's greeting says
it is ready, with no polling for a socket file; if QEMU dies first, the queued
connection is reset.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from common.channel_auth import write_secret
from plugins.qemu import features, hotplug, resize
from plugins.qemu.cmdline import Placed, QemuSettings, VmPaths, build_argv, hotplug_memory_mib
from plugins.qemu.process import QemuProcess
from plugins.qemu.qmp import QmpClient, open_qmp
from plugins.qemu.qmp_errors import QmpCommandError, QmpError
from shim.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    HostError,
    HypervisorError,
    NotSupportedError,
    VmmExitedError,
)
from shim.host import HostFacts
from shim.hypervisor import (
    CLONE,
    TEMPLATE,
    AgentEndpoint,
    BlockDevice,
    Capabilities,
    Device,
    Hypervisor,
    NetDevice,
    SerialEndpoint,
    VmSize,
    VmSpec,
    VmState,
    VsockDevice,
    VsockEndpoint,
)
from shim.resources import DIR, FILE, PROCESS, SOCKET_FILE, Resource, process_start_time
from shim.sandbox.devices import SlotAllocator, guest_cid

log = logging.getLogger("husk.qemu")

AGENT_VSOCK_PORT = 1024
#: Kata's debug console port, where the guest has vsock
DEBUG_CONSOLE_VSOCK_PORT = 1026
#: seconds the guest has to release a hot-removed device (ACPI hot-plug under TCG is slow)
REMOVE_TIMEOUT = 30.0
#: seconds a save or restore may take
MIGRATE_TIMEOUT = 120.0
#: seconds the guest has to plug hot-added memory (it takes ~0.1 s under TCG)
PLUG_TIMEOUT = 30.0
#: seconds to wait for the guest to give memory back before reporting what it kept
UNPLUG_WAIT = 10.0
_POLL = 0.05
#: a migration that leaves out RAM in shared backends (a template's file)
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
#: the name a migration file's fd gets in QEMU (``getfd``), used as ``fd:<name>``
MIGRATION_FD = "migration"
#: how many guest CIDs to try when the first is taken by another VM
_CID_ATTEMPTS = 8

_STATES = {
    "running": VmState.RUNNING,
    "shutdown": VmState.STOPPED,
    "guest-panicked": VmState.STOPPED,
    "internal-error": VmState.STOPPED,
}


class QemuHypervisor(Hypervisor):
    """A sandbox VM in QEMU (q35 or microvm, KVM or TCG)."""

    name = "qemu"

    def __init__(self, section: Mapping[str, Any], host: HostFacts | None = None) -> None:
        self._section = dict(section)
        self._host = host if host is not None else HostFacts.probe()
        default_transport = "vsock" if self._host.vhost_vsock else "virtio-serial"
        transport = str(self._section.get("agent_transport", default_transport))
        self.settings = QemuSettings.from_section(self._section, transport)
        self._spec: VmSpec | None = None
        self._paths: VmPaths | None = None
        self._process: QemuProcess | None = None
        self._placed: dict[str, Placed] = {}
        self._slots = SlotAllocator(self.settings.root_ports)
        self._cid: int | None = None
        self._monitor_lock = trio.Lock()
        #: the last ``add-fd`` set id used (disks are passed to QEMU as fds)
        self._fdsets = 0

    # --- description ----------------------------------------------------------

    def capabilities(self) -> Capabilities:
        """What QEMU does here; CPU and memory hot-plug need q35 (ACPI, device memory).

        vCPU unplug only under KVM: under TCG, QEMU 7.2 aborts with heap corruption
        on the first CPU ``device_add`` after a CPU ``device_del`` (reproduced 5/5),
        so a TCG sandbox gives CPU back through the containers' cgroups instead.
        """
        hotplug = self.settings.pcie and self.settings.pcie_root_ports > 0
        q35 = self.settings.pcie
        return Capabilities(
            block_hotplug=hotplug,
            net_hotplug=hotplug,
            vsock=self._host.vhost_vsock,
            virtio_serial=True,
            shared_fs=frozenset({"9p"}),
            cpu_hotplug=q35,
            vcpu_unplug=q35 and self.settings.accel == "kvm",
            memory_hotplug=q35,
            memory_unplug=q35,
            templates=True,
            relocate=True,
        )

    def console_socket(self) -> Path | None:
        return self._require_paths().console

    def agent_endpoint(self) -> AgentEndpoint:
        if self.settings.agent_transport == "vsock":
            if self._cid is None:
                raise FailedPreconditionError("qemu: the VM has no guest CID before start")
            return VsockEndpoint(self._cid, AGENT_VSOCK_PORT, self._require_paths().agent_secret)
        return SerialEndpoint(self._require_paths().agent)

    def debug_console_endpoint(self) -> AgentEndpoint | None:
        spec = self._spec
        if spec is None or not spec.debug_console:
            return None
        if self.settings.agent_transport == "vsock":
            if self._cid is None:
                return None
            return VsockEndpoint(
                self._cid, DEBUG_CONSOLE_VSOCK_PORT, self._require_paths().agent_secret
            )
        return SerialEndpoint(self._require_paths().debug_console)

    @property
    def paths(self) -> VmPaths:
        """The VM's files (after ``prepare``)."""
        return self._require_paths()

    @property
    def pid(self) -> int | None:
        """QEMU's pid while it runs."""
        return self._process.pid if self._process is not None and self._process.alive else None

    def vmm_pid(self) -> int | None:
        return self.pid

    # --- life -------------------------------------------------------------------

    async def prepare(self, spec: VmSpec) -> None:
        transport = spec.agent_transport
        if transport != "auto" and transport != self.settings.agent_transport:
            self.settings = QemuSettings.from_section(self._section, transport)
        self._check_host(spec)
        paths = VmPaths.for_spec(spec)
        if self.settings.agent_transport == "vsock":
            if not self._host.vhost_vsock:
                raise HostError("qemu: agent transport vsock needs /dev/vhost-vsock on this host")
            self._cid = guest_cid(spec.sandbox_id)
        self._spec, self._paths = spec, paths
        for resource in (
            Resource(DIR, path=str(paths.dir)),
            Resource(SOCKET_FILE, path=str(paths.qmp)),
            Resource(SOCKET_FILE, path=str(paths.agent)),
            Resource(SOCKET_FILE, path=str(paths.console)),
            *([Resource(SOCKET_FILE, path=str(paths.debug_console))] if spec.debug_console else []),
            Resource(FILE, path=str(paths.log)),
            Resource(FILE, path=str(paths.log_rotated)),
            Resource(FILE, path=str(paths.pidfile)),
            Resource(FILE, path=str(paths.agent_secret)),
        ):
            spec.record(resource)
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        paths.dir.mkdir(mode=0o700, exist_ok=True)
        # before QEMU starts: the guest learns it from fw_cfg, every vsock peer must prove it;
        # a fresh one for each VM (a template's never serves its clones)
        write_secret(paths.agent_secret)
        for device in spec.devices:
            self._place(device)

    def _check_host(self, spec: VmSpec) -> None:
        binary = Path(self.settings.binary)
        if not binary.is_file():
            raise HostError(f"qemu binary {binary} not found (key 'path' of [hypervisor.qemu])")
        image = Path(self.settings.image) if self.settings.image else None
        for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd), ("image", image)):
            if path is not None and not path.is_file():
                raise HostError(f"guest {what} {path} not found (run `husk image build`)")
        if spec.shared_fs is not None and spec.shared_fs.kind != "9p":
            raise NotSupportedError(
                self.name, "shared_fs virtio-fs", 'the plugin does not start virtiofsd; use "9p"'
            )

    def _place(self, device: Device) -> Placed:
        bus = None
        if isinstance(device, BlockDevice | NetDevice | VsockDevice) and self.settings.pcie:
            bus = self._slots.take(device.id)
        placed = Placed(device, bus)
        self._placed[device.id] = placed
        return placed

    async def start(self, timeout: float) -> None:
        template = self._require_spec().template
        if template is not None and template.role == CLONE:
            await self._start_clone(template.state, timeout)
        else:
            await self._launch(timeout, incoming=None)

    async def _start_clone(self, state: Path, timeout: float) -> None:
        """A new QEMU on the template's RAM (copy-on-write) that loads its device state.

        ``x-ignore-shared`` makes the stream carry no RAM: the template's file
        is the RAM. A clone whose state does not load (a stale, truncated or
        missing template) makes QEMU exit; that is raised as it is, for the
        caller to fall back to a cold boot.
        """
        if not state.is_file():
            raise FailedPreconditionError(f"qemu: no template state at {state}")
        await self._launch(timeout, incoming="defer")
        try:
            with trio.fail_after(timeout):
                async with self._monitor() as qmp:
                    await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
                    await _pass_fd(qmp, state, os.O_RDONLY)
                    await qmp.execute("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})
                    await _wait_migration(qmp, f"starting a clone of the template {state}")
                    if (await qmp.execute("query-status"))["status"] != "running":
                        await qmp.execute("cont")
        except trio.TooSlowError:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise DeadlineExceededError(
                f"qemu: loading the template {state} took longer than {timeout:g} s"
            ) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise

    def relocate(self, spec: VmSpec) -> None:
        """The VM's state dir was renamed: QMP and the channels are reached at the new paths.

        QEMU keeps every socket it listens on and the 9p export it holds open
        (its ``local`` backend works relative to the export's directory, opened
        once), and its log copier writes through its directory's fd: none of
        them notices the rename.
        """
        paths = VmPaths.for_spec(spec)
        self._spec, self._paths = spec, paths
        if self._process is not None:
            self._process.log = paths.log

    async def save_template(self) -> None:
        """Pause the template VM, write its device state (not its RAM: the file is
        the RAM), and quit QEMU; the template's files are immutable from now on."""
        template = self._require_spec().template
        if template is None or template.role != TEMPLATE:
            raise FailedPreconditionError("qemu: this VM was not booted as a template")
        async with self._monitor() as qmp:
            await qmp.execute("stop")
            await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
            try:
                await _pass_fd(qmp, template.state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                await qmp.execute("migrate", {"uri": f"fd:{MIGRATION_FD}"})
                await _wait_migration(qmp, f"saving the template to {template.state}")
            except BaseException:
                template.state.unlink(missing_ok=True)
                raise
        await self.stop()

    async def _launch(self, timeout: float, incoming: str | None) -> None:
        spec = self._require_spec()
        if self._process is not None and self._process.alive:
            raise FailedPreconditionError(f"sandbox {spec.sandbox_id}: the VM is already running")
        for attempt in range(_CID_ATTEMPTS):
            if self.settings.agent_transport == "vsock":
                self._cid = guest_cid(spec.sandbox_id, attempt)
            try:
                await self._spawn(timeout, incoming)
                return
            except VmmExitedError as exc:
                if not _cid_taken(exc) or attempt == _CID_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _spawn(self, timeout: float, incoming: str | None) -> None:
        spec, paths = self._require_spec(), self._require_paths()
        for stale in (paths.qmp, paths.agent, paths.console, paths.debug_console, paths.pidfile):
            stale.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(paths.qmp))
            listener.listen(4)
            argv = build_argv(
                spec,
                self.settings,
                paths,
                devices=list(self._placed.values()),
                qmp_fd=listener.fileno(),
                guest_cid=self._cid,
                incoming=incoming,
                readonly_ram=await self._clone_ram_readonly(),
            )
            tap_fds = [
                fd
                for placed in self._placed.values()
                if isinstance(placed.device, NetDevice)
                for fd in placed.device.tap_fds
            ]
            process = await QemuProcess.spawn(
                argv, log=paths.log, pass_fds=[listener.fileno(), *tap_fds], plugin=self.name
            )
        finally:
            listener.close()  # QEMU holds the only copy: if it dies, our connection resets
        self._process = process
        # after the spawn (the pid is new); a crash in between is covered by
        # cleanup, which also kills every process whose command line names the state dir
        spec.record(
            Resource(PROCESS, pid=process.pid, start=process_start_time(process.pid), name="qemu")
        )
        try:
            with trio.fail_after(timeout):
                async with self._monitor() as qmp:
                    await qmp.execute("query-status")
        except trio.TooSlowError:
            await process.kill()
            self._remove_sockets()
            raise DeadlineExceededError(
                f"qemu did not answer on {paths.qmp} within {timeout:g} s; "
                f"killed it (see {paths.log})"
            ) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await process.kill()
            self._remove_sockets()
            raise

    async def _clone_ram_readonly(self) -> bool:
        """Whether this VM is a clone whose QEMU can open the template's RAM file O_RDONLY."""
        template = self._require_spec().template
        if template is None or template.role != CLONE:
            return False
        readonly = await features.maps_file_ram_readonly(self.settings.binary)
        if not readonly:
            log.debug(
                "%s has no memory-backend-file rom=off (QEMU 8.2): the clone opens the "
                "template's RAM read-write (its write seals refuse every write)",
                self.settings.binary,
            )
        return readonly

    def _remove_sockets(self) -> None:
        paths = self._require_paths()
        for path in (paths.qmp, paths.agent, paths.console, paths.debug_console, paths.pidfile):
            path.unlink(missing_ok=True)

    async def stop(self) -> None:
        process = self._process
        if process is None or not process.alive:
            if process is not None:
                process.signal_group(signal.SIGKILL)  # helpers, if any outlived QEMU
                # reaped now: a QEMU the guest powered off is not left a zombie until
                # this process exits
                await process.wait_for(self.settings.stop_timeout)
            return
        step = self.settings.stop_timeout
        try:
            running = await self.state() == VmState.RUNNING
        except HypervisorError:
            running = False
        if running and await self._try("system_powerdown"):
            await process.wait_for(step)
        if process.alive and await self._try("quit"):
            await process.wait_for(step)
        if process.alive:
            process.signal_group(signal.SIGTERM)
            await process.wait_for(step)
        if process.alive:
            await process.kill()
        process.signal_group(signal.SIGKILL)
        self._remove_sockets()

    async def _try(self, command: str) -> bool:
        """Run a QMP command if QEMU still answers; whether it was sent."""
        try:
            with trio.move_on_after(self.settings.stop_timeout):
                async with self._monitor() as qmp:
                    await qmp.execute(command)
                return True
        except HypervisorError:
            pass
        return False

    async def destroy(self) -> None:
        if self._paths is None:
            return
        with trio.CancelScope(shield=True):
            await self.stop()
        shutil.rmtree(self._paths.dir, ignore_errors=True)

    async def wait(self) -> int | None:
        """Return QEMU's exit status once it has exited (None if it never started).

        Anyone may wait: a killed QEMU (``kill -9``) wakes every waiter.
        """
        if self._process is None:
            return None
        return await self._process.wait()

    async def state(self) -> VmState:
        process = self._process
        if process is None:
            return VmState.NOT_STARTED
        if not process.alive:
            return VmState.STOPPED
        try:
            async with self._monitor() as qmp:
                status = (await qmp.execute("query-status"))["status"]
        except VmmExitedError:
            return VmState.STOPPED
        return _STATES.get(str(status), VmState.PAUSED)

    # --- devices ----------------------------------------------------------------

    async def add_device(self, device: Device) -> None:
        if device.id in self._placed:
            raise FailedPreconditionError(f"device {device.id} is already attached")
        if isinstance(device, VsockDevice) and not self._host.vhost_vsock:
            raise NotSupportedError(self.name, "hot-add of VsockDevice", "no /dev/vhost-vsock")
        if not isinstance(device, BlockDevice | NetDevice | VsockDevice):
            raise NotSupportedError(
                self.name, f"hot-add of {type(device).__name__}", "QEMU cannot hot-add it"
            )
        if not self.capabilities().block_hotplug:
            raise NotSupportedError(
                self.name, f"hot-add of {type(device).__name__}", "no PCIe root ports (q35 only)"
            )
        placed = self._place(device)
        assert placed.bus is not None
        try:
            async with self._monitor() as qmp:
                if isinstance(device, BlockDevice):
                    self._fdsets += 1
                    await hotplug.add_block(qmp, device, placed.bus, self.settings, self._fdsets)
                elif isinstance(device, NetDevice):
                    await hotplug.add_net(qmp, device, placed.bus, self.settings)
                else:
                    await hotplug.add_vsock(qmp, device, placed.bus, self.settings)
        except BaseException:
            self._unplace(device.id)
            raise

    async def remove_device(self, device: Device) -> None:
        if device.id not in self._placed:
            raise FailedPreconditionError(f"device {device.id} is not attached")
        async with self._monitor() as qmp:
            await hotplug.remove(qmp, device, REMOVE_TIMEOUT)
        self._unplace(device.id)

    def _unplace(self, device_id: str) -> None:
        self._placed.pop(device_id, None)
        self._slots.release(device_id)

    @property
    def devices(self) -> Sequence[Placed]:
        """The devices the VM has (cold- and hot-plugged) and their root ports."""
        return list(self._placed.values())

    # --- vCPUs and memory ---------------------------------------------------------

    async def resize(self, vcpus: int, memory_mib: int) -> VmSize:
        spec = self._require_spec()
        maximum = self._maximum()
        VmSize(vcpus, memory_mib).check_within(maximum, "qemu", spec.sandbox_id)
        async with self._monitor() as qmp:
            await self._resize_vcpus(qmp, max(vcpus, spec.vcpus))
            if maximum.memory_mib > spec.memory_mib:
                await self._resize_memory(qmp, max(memory_mib - spec.memory_mib, 0))
            return await self._size(qmp)

    async def _resize_vcpus(self, qmp: QmpClient, vcpus: int) -> None:
        have = resize.plugged(await resize.cpu_slots(qmp))
        if vcpus > have:
            self._require(self.capabilities().cpu_hotplug, "vCPU hot-plug")
            await resize.add_vcpus(qmp, vcpus - have)
        elif vcpus < have:
            self._require(self.capabilities().vcpu_unplug, "vCPU hot-unplug")
            await resize.remove_vcpus(qmp, have - vcpus, REMOVE_TIMEOUT)

    async def _resize_memory(self, qmp: QmpClient, hot_mib: int) -> None:
        plugged = await resize.plugged_memory_mib(qmp)
        if hot_mib > plugged:
            self._require(self.capabilities().memory_hotplug, "memory hot-plug")
            await resize.set_memory(qmp, hot_mib, PLUG_TIMEOUT, must_reach=True)
        elif hot_mib < plugged:
            self._require(self.capabilities().memory_unplug, "memory hot-unplug")
            await resize.set_memory(qmp, hot_mib, UNPLUG_WAIT, must_reach=False)

    async def size(self) -> VmSize:
        async with self._monitor() as qmp:
            return await self._size(qmp)

    async def _size(self, qmp: QmpClient) -> VmSize:
        spec = self._require_spec()
        vcpus = resize.plugged(await resize.cpu_slots(qmp))
        hot = 0
        if self._maximum().memory_mib > spec.memory_mib:
            hot = await resize.plugged_memory_mib(qmp)
        return VmSize(vcpus, spec.memory_mib + hot)

    def _maximum(self) -> VmSize:
        """What the VM was started with room for (virtio-mem's room is whole blocks)."""
        spec = self._require_spec()
        return VmSize(spec.maximum.vcpus, spec.memory_mib + hotplug_memory_mib(spec, self.settings))

    def _require(self, capable: bool, operation: str) -> None:
        if capable:
            return
        if not self.settings.pcie:
            reason = f"machine {self.settings.machine_type} has no ACPI hot-plug; use q35"
        elif operation == "vCPU hot-unplug":
            reason = "under TCG, QEMU 7.2 crashes on the next vCPU hot-add after an unplug"
        else:
            reason = ""
        raise NotSupportedError(self.name, operation, reason)

    async def qmp(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return its result (diagnostics and tests)."""
        async with self._monitor() as qmp:
            return await qmp.execute(command, arguments)

    # --- internals ----------------------------------------------------------------

    @asynccontextmanager
    async def _monitor(self) -> AsyncIterator[QmpClient]:
        """A QMP connection for one operation; QEMU's death becomes ``VmmExitedError``."""
        process = self._process
        if process is None:
            raise FailedPreconditionError("qemu: the VM is not started")
        paths = self._require_paths()
        async with self._monitor_lock:
            try:
                try:
                    stream = await trio.open_unix_socket(str(paths.qmp))
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                        raise QmpError(f"cannot connect to {paths.qmp}: {exc.strerror}") from exc
                    raise
                async with open_qmp(stream) as qmp:
                    yield qmp
            except QmpError as exc:
                if isinstance(exc, QmpCommandError):
                    raise
                # a lost connection usually means QEMU died: say so, with its last words
                if await process.wait_for(1.0):
                    raise process.exited_error() from exc
                raise

    def _require_spec(self) -> VmSpec:
        if self._spec is None:
            raise FailedPreconditionError("qemu: prepare() was not called")
        return self._spec

    def _require_paths(self) -> VmPaths:
        if self._paths is None:
            raise FailedPreconditionError("qemu: prepare() was not called")
        return self._paths


async def _pass_fd(qmp: QmpClient, path: Path, flags: int) -> None:
    """Open ``path`` here and hand the fd to QEMU as ``MIGRATION_FD`` (SCM_RIGHTS)."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        await qmp.execute("getfd", {"fdname": MIGRATION_FD}, fds=[fd])
    finally:
        os.close(fd)


async def _wait_migration(qmp: QmpClient, what: str) -> None:
    """Poll ``query-migrate`` until the migration completes; raise if it fails."""
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc", status)
            raise HypervisorError(f"qemu: {what} failed: {desc}")
        await trio.sleep(_POLL)


def _cid_taken(exc: VmmExitedError) -> bool:
    text = exc.stderr_tail.lower()
    return "guest cid" in text or "address already in use" in text
