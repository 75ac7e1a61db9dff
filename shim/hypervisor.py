"""The seam between the sandbox and a VMM: the ``Hypervisor`` interface.

A plugin (``plugins/qemu``, ``plugins/cloud_hypervisor``, ``plugins/builtin`` or a
third-party distribution) implements ``Hypervisor`` for one VMM and describes
itself to the registry with a ``HypervisorPlugin``: its name, the keys of its
config section, how to adjust them for this host, and how to make a
``Hypervisor`` for one sandbox.

Callers check ``capabilities()`` before asking for optional operations; a plugin
that is asked anyway raises ``NotSupportedError`` naming itself and the operation.

A VM boots with ``VmSpec.vcpus``/``memory_mib`` and room to grow up to
``max_vcpus``/``max_memory_mib``; ``resize`` hot-plugs towards a new size and
``size`` reads back what the VM has. Growing and shrinking are separate
capabilities because a VMM may add what it cannot safely take back (QEMU 7.2
under TCG crashes on the next vCPU add after a vCPU unplug).
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.errors import InvalidArgumentError, NotSupportedError
from shim.resources import Resource

if TYPE_CHECKING:
    from shim.config.schema import Key
    from shim.host import HostFacts


class VmState(enum.Enum):
    """Where a sandbox VM is in its life."""

    NOT_STARTED = "not-started"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Capabilities:
    """What a plugin can do on this host; callers check before calling."""

    block_hotplug: bool = False
    net_hotplug: bool = False
    vsock: bool = False
    hybrid_vsock: bool = False
    virtio_serial: bool = False
    shared_fs: frozenset[str] = frozenset()
    #: vCPUs can be hot-added up to ``VmSpec.max_vcpus``
    cpu_hotplug: bool = False
    #: hot-added vCPUs can be taken away again
    vcpu_unplug: bool = False
    #: memory can be hot-added up to ``VmSpec.max_memory_mib``
    memory_hotplug: bool = False
    #: hot-added memory can be given back (never below the boot memory)
    memory_unplug: bool = False
    #: VM templates: boot with the guest's RAM in a file, save the device state
    #: alone, start clones that map the RAM copy-on-write (see ``TemplateFiles``)
    templates: bool = False
    #: a running VM's state dir can be renamed under it (``relocate``): the VM pool
    #: hands a booted VM over to its sandbox that way
    relocate: bool = False


# --- devices -------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    """A disk image or block device to attach; ``serial`` lets the guest find it."""

    id: str
    path: Path
    format: str = "raw"
    readonly: bool = False
    serial: str = ""


@dataclass(frozen=True)
class NetDevice:
    """A virtio-net NIC backed by a host tap, opened by name or passed as fds."""

    id: str
    mac: str
    tap_name: str = ""
    tap_fds: tuple[int, ...] = ()
    mtu: int = 1500


@dataclass(frozen=True)
class VsockDevice:
    """A vhost-vsock device with a unique guest CID."""

    id: str
    guest_cid: int


@dataclass(frozen=True)
class SharedFsDevice:
    """A host directory shared into the guest under ``tag`` (9p or virtio-fs)."""

    id: str
    tag: str
    path: Path
    kind: str = "9p"


Device = BlockDevice | NetDevice | VsockDevice | SharedFsDevice


# --- agent endpoints -------------------------------------------------------------


@dataclass(frozen=True)
class VsockEndpoint:
    """AF_VSOCK: the guest's CID and the agent's port.

    Every host process can connect to a vsock port, so the guest serves only a
    peer that proves the sandbox's secret: ``secret`` is the 0600 file holding
    it (the plugin wrote it and gave it to the guest by a path no other host
    user can read; see ``common.channel_auth``).
    """

    cid: int
    port: int
    secret: Path | None = None


@dataclass(frozen=True)
class HybridVsockEndpoint:
    """A unix socket on which ``CONNECT <port>\\n`` reaches the guest's vsock port.

    ``secret`` as for ``VsockEndpoint``: the guest's vsock port wants the proof.
    """

    path: Path
    port: int
    secret: Path | None = None


@dataclass(frozen=True)
class SerialEndpoint:
    """A unix socket bound to the guest's virtio-serial port ``agent.channel.0``.

    No handshake: the socket is QEMU's, in the sandbox's root-only state dir.
    """

    path: Path


AgentEndpoint = VsockEndpoint | HybridVsockEndpoint | SerialEndpoint


# --- VM templates ----------------------------------------------------------------

#: what a VM is to a template: booted to become one, or started as a copy of one
TEMPLATE, CLONE = "template", "clone"


@dataclass(frozen=True)
class TemplateFiles:
    """A VM template: the guest's RAM in a file and its device state.

    A ``template`` VM boots with its RAM in ``memory`` (shared: the file is the
    RAM) and ``save_template`` writes only its device state to ``state``. A
    ``clone`` maps ``memory`` privately, copy-on-write, and loads ``state``:
    clones share every page none of them has written, and start in a fraction
    of a boot. Both are immutable once the template is saved: ``memory`` is a
    memfd (``/proc/<holder>/fd/<n>``) sealed against writes, which a clone may
    open read-write and map privately but never write through.
    """

    memory: Path
    state: Path
    role: str = CLONE


# --- the sandbox VM's description --------------------------------------------------


@dataclass(frozen=True, order=True)
class VmSize:
    """How many vCPUs and how much memory (MiB) a VM has or should have."""

    vcpus: int
    memory_mib: int

    def check_within(self, maximum: VmSize, plugin: str, sandbox_id: str) -> None:
        """InvalidArgumentError unless this size fits the room a VM was started with."""
        if self.vcpus > maximum.vcpus or self.memory_mib > maximum.memory_mib:
            raise InvalidArgumentError(
                f"{plugin}: sandbox {sandbox_id} cannot grow to {self.vcpus} vCPUs and "
                f"{self.memory_mib} MiB: its VM was started with room for {maximum.vcpus} vCPUs "
                f"and {maximum.memory_mib} MiB"
            )


#: writes a host resource to the sandbox's record; called *before* creating it
Recorder = Callable[[Resource], object]


def record_nothing(resource: Resource) -> None:
    """A recorder for VMs that no sandbox owns (tests, benchmarks)."""


#: the longest unix socket path a VMM can listen on (``sun_path`` holds 108 bytes, NUL
#: included)
UNIX_PATH_MAX = 107

#: the section keys that name the guest's boot files (a plugin has those it uses):
#: the kernel, the initrd and a root filesystem image
GUEST_FILE_KEYS = ("kernel", "initrd", "image")


@dataclass(frozen=True)
class VmSpec:
    """What a sandbox asks of its VM; the plugin's config fills in the rest."""

    sandbox_id: str
    state_dir: Path
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path | None
    kernel_params: str = ""
    #: the sandbox's shared directory, exported at boot (None: block devices only)
    shared_fs: SharedFsDevice | None = None
    devices: Sequence[Device] = field(default_factory=tuple)
    #: ``[agent.husk] transport`` as resolved by the config; "auto" lets the plugin pick
    agent_transport: str = "auto"
    #: where the plugin records each process, socket and file before it creates it
    record: Recorder = record_nothing
    #: boot as a template, or start as a clone of one (``Capabilities.templates``)
    template: TemplateFiles | None = None
    #: give the guest's debug console a channel of its own (see ``debug_console_endpoint``)
    debug_console: bool = False
    #: how far ``resize`` may grow the VM; at or below the boot size: no room to grow
    max_vcpus: int = 0
    max_memory_mib: int = 0

    @property
    def maximum(self) -> VmSize:
        """The largest size this VM can reach (never below its boot size)."""
        return VmSize(max(self.vcpus, self.max_vcpus), max(self.memory_mib, self.max_memory_mib))


class Hypervisor(abc.ABC):
    """One sandbox VM driven through one VMM.

    The life is ``prepare`` → ``start`` → (device changes, ``resize``) →
    ``stop`` → ``destroy``. The plugin records every host resource it creates
    through ``VmSpec.record`` before creating it, so a crash leaves nothing that
    ``husk cleanup`` cannot find.
    """

    #: the registry name of the plugin, used in every error message
    name: str = "hypervisor"

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this plugin supports on this host."""

    @abc.abstractmethod
    async def prepare(self, spec: VmSpec) -> None:
        """Create the sandbox dir, sockets and command line; start nothing yet."""

    @abc.abstractmethod
    async def start(self, timeout: float) -> None:
        """Boot the VM; return once the VMM answers its control channel."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Shut the guest down, escalating to killing the VMM."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Stop if needed and remove every host resource the VM had."""

    @abc.abstractmethod
    async def state(self) -> VmState:
        """The VM's state, from the VMM and the liveness of its process."""

    @abc.abstractmethod
    def agent_endpoint(self) -> AgentEndpoint:
        """Where the shim reaches the guest agent.

        A vsock or hybrid vsock endpoint names the sandbox's secret file, which
        the plugin wrote (0600) before the VMM started and gave the guest by a
        path no other host user can read (never argv or the kernel command line).
        """

    def console_socket(self) -> Path | None:
        """A unix socket that streams the guest's console (after ``prepare``), if any.

        The sandbox reads it into a bounded log; a plugin must not keep the
        console itself in a file that grows without end (the guest writes it).
        """
        return None

    def debug_console_endpoint(self) -> AgentEndpoint | None:
        """Where ``husk exec`` reaches the guest's debug console (after ``start``); None: none.

        The endpoint types are the agent's: the console speaks its own framing
        (``common.console``) on a channel of its own.
        """
        return None

    def vmm_pid(self) -> int | None:
        """The VMM's host process while it runs (metrics read its ``/proc``); None: none."""
        return None

    async def wait(self) -> int | None:
        """Return once the VMM process has exited, with its status (None if unknown)."""
        raise NotSupportedError(self.name, "waiting for the VM to exit")

    async def add_device(self, device: Device) -> None:
        """Hot-add a device to the running VM."""
        raise NotSupportedError(self.name, f"hot-add of {type(device).__name__}")

    async def remove_device(self, device: Device) -> None:
        """Hot-remove a device, returning once the guest has released it."""
        raise NotSupportedError(self.name, f"hot-remove of {type(device).__name__}")

    async def resize(self, vcpus: int, memory_mib: int) -> VmSize:
        """Hot-plug vCPUs and memory until the running VM has ``vcpus`` and ``memory_mib``.

        Growing needs ``cpu_hotplug``/``memory_hotplug`` and stays within
        ``VmSpec.maximum``; shrinking needs ``vcpu_unplug``/``memory_unplug`` and
        never goes below the boot size (a smaller request means "as small as
        possible"). Memory is rounded up to the plugin's granularity. Returns
        once the VMM reports the new size, or, when shrinking, once the guest
        has given back what it could: the result is the size reached.
        """
        raise NotSupportedError(self.name, "resizing the VM")

    async def size(self) -> VmSize:
        """The vCPUs and memory the running VM has now."""
        raise NotSupportedError(self.name, "reading the VM's size")

    async def save_template(self) -> None:
        """Pause a VM booted as a template, write its device state, and stop it."""
        raise NotSupportedError(self.name, "saving a VM template")

    def relocate(self, spec: VmSpec) -> None:
        """The running VM's state dir was renamed: use ``spec``'s paths from now on.

        ``spec`` is the spec the VM was started with, its ``state_dir`` (and the
        paths under it, such as ``shared_fs``) at the new place. The VMM keeps
        its open sockets and files; only what the plugin opens by path changes.
        Needs ``Capabilities.relocate``.
        """
        raise NotSupportedError(self.name, "handing a running VM over (relocate)")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


class HypervisorPlugin(abc.ABC):
    """How the registry knows a VMM: its name, config section and factory.

    A plugin owns its config section ``[hypervisor.<name>]``: ``keys`` declares
    every key with its default and what is allowed, ``adjust`` resolves values
    that depend on the host (``accel = "auto"``), and ``validate`` checks what a
    single key cannot (the kernel file exists, the binary runs).
    """

    #: registry name and config section name (``[hypervisor.<name>]``)
    name: str

    @property
    @abc.abstractmethod
    def keys(self) -> Sequence[Key]:
        """The keys of this plugin's config section, with defaults."""

    def adjust(self, values: dict[str, Any], host: HostFacts) -> dict[str, Any]:
        """Resolve host-dependent values (e.g. ``auto``); default: unchanged."""
        return values

    def validate(self, values: Mapping[str, Any], host: HostFacts) -> list[tuple[str, str]]:
        """Cross-key and host checks; returns ``(key, problem)`` pairs."""
        return []

    def agent_transports(self, host: HostFacts) -> Sequence[str]:
        """Agent transports this VMM offers on this host, preferred first."""
        return ("virtio-serial",)

    def unmet_requirements(self, values: Mapping[str, Any], host: HostFacts) -> list[str]:
        """What this host lacks to start a sandbox with this section, in words.

        Unlike ``validate`` this is not a config error (the default config has a
        section for every built-in plugin, used or not); ``husk check`` reports it
        and a sandbox start refuses on it. The default checks the files the
        section names: the VMM binary (if the plugin has one), kernel, initrd and image.
        """
        problems = []
        binary = values.get("path")
        if binary is not None and not _is_executable(Path(binary)):
            problems.append(f"{self.name} binary {binary} not found or not executable (key 'path')")
        for key in GUEST_FILE_KEYS:
            value = values.get(key)
            if value and not Path(value).is_file():
                problems.append(
                    f"guest {key} {value} not found (run `husk image build` or set '{key}')"
                )
        return problems

    @abc.abstractmethod
    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        """Make the driver for one sandbox from the adjusted section."""


class HybridVsockKvmPlugin(HypervisorPlugin):
    """A VMM in the Firecracker/Cloud Hypervisor mould: KVM only, virtio-fs, hybrid vsock.

    ``label`` names the VMM in messages ("Cloud Hypervisor", "the built-in VMM").
    """

    label: str

    def agent_transports(self, host: HostFacts) -> Sequence[str]:
        return ("hybrid-vsock",)

    def validate(self, values: Mapping[str, Any], host: HostFacts) -> list[tuple[str, str]]:
        if values["shared_fs"] == "9p":
            return [("shared_fs", f'{self.label} has no 9p; use "virtio-fs" or "none"')]
        return []

    def unmet_requirements(self, values: Mapping[str, Any], host: HostFacts) -> list[str]:
        problems = super().unmet_requirements(values, host)
        if not host.kvm_usable:
            problems.append(f"{self.label} needs usable KVM: {host.kvm_reason}")
        return problems

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        """No driver yet: the section and host checks exist, a sandbox cannot start."""
        raise NotSupportedError(
            self.name, "starting a sandbox", f"no driver for {self.label} exists yet"
        )
