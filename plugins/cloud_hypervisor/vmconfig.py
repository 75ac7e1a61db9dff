"""What husk asks of Cloud Hypervisor, as the JSON bodies of its API.

Field names and shapes are those of Cloud Hypervisor's OpenAPI document
(``vmm/src/api/openapi/cloud-hypervisor.yaml``): ``VmConfig`` for ``vm.create``,
``DiskConfig``, ``NetConfig`` and ``FsConfig`` for ``vm.add-*``, ``VmResize``.
Cloud Hypervisor ignores fields it does not know, so a misspelt one would be
dropped without a word; the contract test (``tests/unit/cloud_hypervisor``)
holds every body against the document with unknown fields refused.

Sizes are bytes. Memory beyond the boot size is a virtio-mem region, which
Cloud Hypervisor rounds to 128 MiB and plugs in 2 MiB blocks; guest RAM is
shared (``memory.shared``) because virtio-fs is a vhost-user device and
virtiofsd must map it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.channel_auth import SMBIOS_OEM_PREFIX
from shim.hypervisor import BlockDevice, NetDevice, SharedFsDevice, VmSpec

MIB = 1 << 20
#: Cloud Hypervisor's virtio-mem region alignment (``VIRTIO_MEM_ALIGN_SIZE``)
VIRTIO_MEM_ALIGN_MIB = 128
#: and the block size the guest plugs and unplugs (``VIRTIO_MEM_DEFAULT_BLOCK_SIZE``)
VIRTIO_MEM_BLOCK_MIB = 2
#: the guest's vsock CID; with hybrid vsock each VMM has its own socket, so any
#: CID works and every sandbox uses the first one that is not reserved (as Kata)
GUEST_CID = 3
#: the guest kernel's own parameters on a Cloud Hypervisor machine: the serial
#: console, reboot at once on panic (the event monitor reports the reboot), no
#: PS/2 probing; hot-plugged memory comes online by itself where it can be unplugged
BASE_KERNEL_PARAMS = (
    "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp "
    "i8042.dumbkbd no_timer_check noreplace-smp cryptomgr.notests "
    "memhp_default_state=online memory_hotplug.online_policy=auto-movable"
)
#: Cloud Hypervisor's ``ImageType`` for husk's disk formats: stating it means a guest
#: that writes a qcow2 header onto its raw disk cannot change how the VMM reads it
IMAGE_TYPES = {"raw": "Raw", "qcow2": "Qcow2"}
#: virtio-fs queues, as Kata configures them
FS_QUEUES, FS_QUEUE_SIZE = 1, 1024


@dataclass(frozen=True)
class ChSettings:
    """The ``[hypervisor.cloud-hypervisor]`` values the driver reads."""

    binary: str
    virtiofsd: str
    kernel_params: str
    seccomp: str
    enable_debug: bool
    boot_timeout: float
    stop_timeout: float
    api_timeout: float

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> ChSettings:
        """The settings from the (adjusted) config section."""
        return cls(
            binary=str(section.get("path", "/usr/bin/cloud-hypervisor")),
            virtiofsd=str(section.get("virtiofsd", "/usr/libexec/virtiofsd")),
            kernel_params=str(section.get("kernel_params", "")),
            seccomp=str(section.get("seccomp", "true")),
            enable_debug=bool(section.get("enable_debug", False)),
            boot_timeout=float(section.get("boot_timeout", 30.0)),
            stop_timeout=float(section.get("stop_timeout", 10.0)),
            api_timeout=float(section.get("api_timeout", 30.0)),
        )


@dataclass(frozen=True)
class VmPaths:
    """The files of one VM, in the driver's own directory ``<state_dir>/cloud-hypervisor``."""

    dir: Path

    @property
    def api(self) -> Path:
        """Cloud Hypervisor's API socket."""
        return self.dir / "api.sock"

    @property
    def vsock(self) -> Path:
        """The hybrid-vsock socket: ``CONNECT <port>`` reaches the guest's vsock port."""
        return self.dir / "vsock.sock"

    @property
    def console(self) -> Path:
        """The guest's serial console: a socket the sandbox reads into a bounded log."""
        return self.dir / "console.sock"

    @property
    def agent_secret(self) -> Path:
        """The sandbox's channel secret (0600); the guest gets it as an SMBIOS OEM string."""
        return self.dir / "agent.secret"

    @property
    def log(self) -> Path:
        """Cloud Hypervisor's own output."""
        return self.dir / "cloud-hypervisor.log"

    def virtiofs(self, device_id: str) -> Path:
        """The vhost-user socket of the virtiofsd serving ``device_id``."""
        return self.dir / f"fs-{device_id}.sock"

    def virtiofsd_log(self, device_id: str) -> Path:
        """That virtiofsd's output."""
        return self.dir / f"virtiofsd-{device_id}.log"

    def sockets(self) -> list[Path]:
        """The sockets whose paths must fit a ``sockaddr_un``."""
        return [self.api, self.vsock, self.console]


def kernel_cmdline(spec: VmSpec, settings: ChSettings) -> str:
    """The guest kernel command line: the image's own, then the spec's and config's extras."""
    parts = [BASE_KERNEL_PARAMS]
    if spec.kernel_params:
        parts.append(spec.kernel_params)
    if settings.kernel_params and settings.kernel_params not in spec.kernel_params:
        parts.append(settings.kernel_params)
    return " ".join(parts)


def hotplug_memory_mib(spec: VmSpec) -> int:
    """MiB of virtio-mem room beyond the boot memory, cut to whole 128 MiB regions."""
    room = spec.maximum.memory_mib - spec.memory_mib
    return room - room % VIRTIO_MEM_ALIGN_MIB


def vm_config(
    spec: VmSpec,
    settings: ChSettings,
    paths: VmPaths,
    disks: list[BlockDevice],
    shares: list[SharedFsDevice],
    secret: bytes,
) -> dict[str, Any]:
    """The ``VmConfig`` body of ``vm.create`` (NICs are added before boot, with their fds).

    ``secret`` is the sandbox's channel secret: Cloud Hypervisor has no fw_cfg, so
    it rides as an SMBIOS OEM string in this body, sent over the root-only API
    socket (never argv, never the kernel command line).
    """
    memory: dict[str, Any] = {"size": spec.memory_mib * MIB, "shared": True}
    room = hotplug_memory_mib(spec)
    if room:
        memory |= {"hotplug_size": room * MIB, "hotplug_method": "VirtioMem"}
    payload: dict[str, Any] = {
        "kernel": str(spec.kernel),
        "cmdline": kernel_cmdline(spec, settings),
    }
    if spec.initrd is not None:
        payload["initramfs"] = str(spec.initrd)
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.maximum.vcpus},
        "memory": memory,
        "payload": payload,
        "serial": {"mode": "Socket", "socket": str(paths.console)},
        "console": {"mode": "Off"},
        "vsock": {"cid": GUEST_CID, "socket": str(paths.vsock)},
        "rng": {"src": "/dev/urandom"},
        # the guest reports a panic through the pvpanic device to the event monitor
        "pvpanic": True,
        "platform": {"oem_strings": [f"{SMBIOS_OEM_PREFIX}{secret.hex()}"]},
    }
    if disks:
        config["disks"] = [disk_config(d) for d in disks]
    if shares:
        config["fs"] = [fs_config(s, paths.virtiofs(s.id)) for s in shares]
    return config


def disk_config(device: BlockDevice) -> dict[str, Any]:
    """A ``DiskConfig``: the image, read-only or not, its format stated, its serial."""
    config: dict[str, Any] = {
        "id": device.id,
        "path": str(device.path),
        "readonly": device.readonly,
        "image_type": IMAGE_TYPES[device.format],
    }
    if device.serial:
        config["serial"] = device.serial
    return config


def net_config(device: NetDevice) -> dict[str, Any]:
    """A ``NetConfig``: a tap by name, or by its queue fds (sent along as ``SCM_RIGHTS``).

    Cloud Hypervisor wants two virtqueues (rx, tx) per tap fd.
    """
    config: dict[str, Any] = {"id": device.id, "mac": device.mac, "mtu": device.mtu}
    if device.tap_fds:
        config["num_queues"] = 2 * len(device.tap_fds)
    else:
        config["tap"] = device.tap_name
    return config


def fs_config(device: SharedFsDevice, socket: Path) -> dict[str, Any]:
    """An ``FsConfig``: the tag the guest mounts and virtiofsd's vhost-user socket."""
    return {
        "id": device.id,
        "tag": device.tag,
        "socket": str(socket),
        "num_queues": FS_QUEUES,
        "queue_size": FS_QUEUE_SIZE,
    }


def resize_body(vcpus: int, memory_mib: int) -> dict[str, Any]:
    """A ``VmResize``: the vCPUs and the total RAM (bytes) the VM should have."""
    return {"desired_vcpus": vcpus, "desired_ram": memory_mib * MIB}


def round_memory_mib(memory_mib: int) -> int:
    """Memory rounded up to whole virtio-mem blocks."""
    return -(-memory_mib // VIRTIO_MEM_BLOCK_MIB) * VIRTIO_MEM_BLOCK_MIB
