"""The QEMU command line of a sandbox VM, built from its ``VmSpec`` and the config.

A pure function of its inputs (no files touched), so unit tests compare argv.
Device options are built once, as the dicts QMP's ``blockdev-add``,
``netdev_add`` and ``device_add`` take; the command line passes the very same
dicts in QEMU's JSON option syntax, so a cold-plugged, hot-plugged or restored
device looks identical to QEMU.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.errors import InvalidArgumentError, NotSupportedError
from shim.hypervisor import (
    TEMPLATE,
    UNIX_PATH_MAX,
    BlockDevice,
    Device,
    NetDevice,
    SharedFsDevice,
    VmSpec,
    VsockDevice,
)

#: the guest kernel's own parameters on a QEMU machine, before the spec's and the config's:
#: the serial console, no reboot loop on panic, no probing of the PS/2 controller
#: and no TSC calibration (both slow under TCG), no crypto self-tests at boot;
#: hot-plugged memory comes online by itself, in ZONE_MOVABLE where it can be
#: unplugged again (``auto-movable``); no bounce buffers for the hot-plug range
#: above 4 GiB, which would cost the guest 64 MiB at boot (virtio does not need them)
BASE_KERNEL_PARAMS = (
    "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp "
    "i8042.dumbkbd tsc=reliable no_timer_check noreplace-smp cryptomgr.notests "
    "memhp_default_state=online memory_hotplug.online_policy=auto-movable swiotlb=noforce"
)
#: added under TCG only: an emulated CPU executes nothing speculatively, so the
#: guest's Spectre-class mitigations (retpolines, usercopy and swapgs barriers)
#: guard against nothing there and slow every syscall and indirect call
#: (measured: the agent's imports, 1.65 s -> 1.27 s). Under KVM they stay on.
TCG_KERNEL_PARAMS = "mitigations=off"
#: the virtio-balloon device (free page reporting only)
BALLOON_ID = "balloon0"
#: the virtio-serial port name the guest agent opens
AGENT_PORT = "agent.channel.0"
#: QEMU's seccomp filter: no obsolete syscalls, no set*id, no fork/exec, no
#: scheduler/priority changes (QEMU 7.2's own names for each group)
SECCOMP_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: the virtio-serial port of the guest's debug console (``common.console``)
DEBUG_CONSOLE_PORT = "console.channel.0"
#: the fw_cfg file that carries the sandbox's channel secret into the guest (the agent
#: reads it from /sys/firmware/qemu_fw_cfg/by_name/<name>/raw); only its path is in argv
SECRET_FW_CFG_NAME = "opt/io.husk/agent-secret"
#: the memory backend of a template's (or a clone's) RAM
TEMPLATE_RAM = "ram0"
#: the virtio-mem device that carries every hot-plugged MiB, and its memory backend
VIRTIO_MEM_ID = "vmem0"
VIRTIO_MEM_BACKEND = "vmem0-ram"
#: the virtio-pmem device that maps the shared root image, and its memory backend
ROOT_IMAGE_ID = "rootimg"
ROOT_IMAGE_BACKEND = "rootimg-mem"
MiB = 1024 * 1024
#: the image's size is a whole number of these (the guest maps a pmem region in 2 MiB steps)
ROOT_IMAGE_ALIGN = 2 * MiB
#: virtio-mem's unit of plugging (the guest's subblock); sizes are multiples of it
VIRTIO_MEM_BLOCK_MIB = 2


@dataclass(frozen=True)
class QemuSettings:
    """The ``[hypervisor.qemu]`` values the command line needs (already adjusted)."""

    binary: str = "/usr/bin/qemu-system-x86_64"
    machine_type: str = "q35"
    accel: str = "tcg"
    cpu_model: str = "max"
    #: ``-accel tcg,tb-size=``: MiB of translated code kept under TCG (0: QEMU's 1 GiB)
    tcg_tb_size: int = 0
    pcie_root_ports: int = 4
    kernel_params: str = ""
    boot_timeout: float = 30.0
    stop_timeout: float = 10.0
    enable_debug: bool = False
    agent_transport: str = "virtio-serial"
    #: ``-sandbox`` (QEMU's seccomp filter); "" for none
    seccomp_sandbox: str = SECCOMP_SANDBOX
    #: ``-runas``: the user QEMU drops to once its devices are open; "" stays root
    run_as: str = ""
    #: the shared read-only root image mapped through virtio-pmem; "" boots the initrd alone
    image: str = ""

    @classmethod
    def from_section(cls, section: Mapping[str, Any], agent_transport: str) -> QemuSettings:
        """Read the adjusted section (``accel``/``cpu_model`` already resolved)."""
        return cls(
            binary=str(section.get("path", cls.binary)),
            machine_type=str(section.get("machine_type", cls.machine_type)),
            accel=str(section.get("accel", cls.accel)),
            cpu_model=str(section.get("cpu_model", cls.cpu_model)),
            tcg_tb_size=int(section.get("tcg_tb_size", cls.tcg_tb_size)),
            pcie_root_ports=int(section.get("pcie_root_ports", cls.pcie_root_ports)),
            kernel_params=str(section.get("kernel_params", "")),
            boot_timeout=float(section.get("boot_timeout", cls.boot_timeout)),
            stop_timeout=float(section.get("stop_timeout", cls.stop_timeout)),
            enable_debug=bool(section.get("enable_debug", False)),
            agent_transport=agent_transport,
            seccomp_sandbox=str(section.get("seccompsandbox", SECCOMP_SANDBOX)),
            run_as=str(section.get("run_as", "")),
            image=str(section.get("image", "")),
        )

    @property
    def pcie(self) -> bool:
        """Whether devices sit on PCI(e) (q35) rather than virtio-mmio (microvm)."""
        return self.machine_type != "microvm"

    @property
    def root_ports(self) -> list[str]:
        """The ids of the hot-plug root ports."""
        return [f"rp{i}" for i in range(self.pcie_root_ports)] if self.pcie else []


@dataclass(frozen=True)
class VmPaths:
    """The files of one VM, all in the driver's own directory ``<state_dir>/qemu``."""

    dir: Path

    @classmethod
    def for_spec(cls, spec: VmSpec) -> VmPaths:
        """The paths under the sandbox's state dir; refuses socket paths too long."""
        paths = cls(spec.state_dir / "qemu")
        for sock in (paths.qmp, paths.agent, paths.console, paths.debug_console):
            if len(str(sock).encode()) > UNIX_PATH_MAX:
                raise InvalidArgumentError(
                    f"sandbox {spec.sandbox_id}: socket path {sock} is longer than "
                    f"{UNIX_PATH_MAX} bytes; use a shorter state_dir in [runtime]"
                )
        return paths

    @property
    def qmp(self) -> Path:
        """QEMU's QMP socket."""
        return self.dir / "qmp.sock"

    @property
    def agent(self) -> Path:
        """The virtio-serial agent channel's socket."""
        return self.dir / "agent.sock"

    @property
    def debug_console(self) -> Path:
        """The virtio-serial debug console's socket (``husk exec``); the dir is 0700."""
        return self.dir / "debug-console.sock"

    @property
    def console(self) -> Path:
        """The guest's serial console: a socket the sandbox reads into a bounded log."""
        return self.dir / "console.sock"

    @property
    def agent_secret(self) -> Path:
        """The sandbox's channel secret (0600): QEMU reads it into the guest's fw_cfg."""
        return self.dir / "agent.secret"

    @property
    def log(self) -> Path:
        """QEMU's own stderr (and ``-d`` log), rotated into ``log_rotated`` at its cap."""
        return self.dir / "qemu.log"

    @property
    def log_rotated(self) -> Path:
        """The previous ``qemu.log``, once it reached its cap."""
        return self.dir / "qemu.log.1"

    @property
    def pidfile(self) -> Path:
        """QEMU's pid, written by QEMU itself (``-pidfile``)."""
        return self.dir / "qemu.pid"


@dataclass(frozen=True)
class Placed:
    """A device and the hot-plug slot (root port) it sits on, if any."""

    device: Device
    bus: str | None = None


def kernel_append(spec: VmSpec, settings: QemuSettings) -> str:
    """The guest kernel command line: the image's own, then the spec's and config's extras."""
    parts = [BASE_KERNEL_PARAMS]
    if settings.accel.split(",")[0] == "tcg":
        parts.append(TCG_KERNEL_PARAMS)
    if spec.kernel_params:
        parts.append(spec.kernel_params)
    if settings.kernel_params and settings.kernel_params not in spec.kernel_params:
        parts.append(settings.kernel_params)
    return " ".join(parts)


def build_argv(
    spec: VmSpec,
    settings: QemuSettings,
    paths: VmPaths,
    *,
    devices: Sequence[Placed] = (),
    qmp_fd: int | None = None,
    guest_cid: int | None = None,
    incoming: str | None = None,
    readonly_ram: bool = False,
) -> list[str]:
    """The full QEMU argv.

    ``qmp_fd`` is a listening socket the caller made (QEMU then only accepts on
    it); without it QEMU creates ``paths.qmp`` itself. ``guest_cid`` is needed
    when the agent transport is vsock. ``incoming`` is a migration source
    (``defer`` to give it later with ``migrate-incoming``). ``readonly_ram``:
    this QEMU maps a read-only file as writable private RAM (see
    ``template_memory_args``).
    """
    argv = [
        settings.binary,
        "-name", f"husk-{spec.sandbox_id[:32]},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-machine", _machine(settings) + _memory_backend_option(spec),
        "-accel", accel_option(settings),
        "-cpu", settings.cpu_model,
        "-smp", smp_option(spec, settings),
        "-m", memory_option(spec, settings),
        "-pidfile", str(paths.pidfile),
        "-kernel", str(spec.kernel),
    ]  # fmt: skip
    argv += template_memory_args(spec, readonly_ram)
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += ["-append", kernel_append(spec, settings)]
    # the secret by file: its bytes never appear in argv or on the kernel command line
    argv += ["-fw_cfg", f"name={SECRET_FW_CFG_NAME},file={_opt(paths.agent_secret)}"]
    if settings.seccomp_sandbox:
        argv += ["-sandbox", _seccomp(settings)]
    if settings.run_as:
        argv += ["-runas", settings.run_as]
    if settings.enable_debug:
        # guest errors and unimplemented-device accesses, time-stamped, on stderr: the
        # bounded qemu.log (a guest decides how much there is)
        argv += ["-msg", "timestamp=on", "-d", "guest_errors,unimp"]
    argv += ["-chardev", f"socket,id=console,path={_opt(paths.console)},server=on,wait=off"]
    argv += ["-serial", "chardev:console"]
    if qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off"]
    else:
        argv += ["-chardev", f"socket,id=qmp,path={_opt(paths.qmp)},server=on,wait=off"]
    argv += ["-mon", "chardev=qmp,mode=control"]
    for port in settings.root_ports:
        # chassis numbers must be unique per root port; slots are assigned by QEMU
        index = int(port[2:])
        argv += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={index + 1}"]
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom"]
    argv += ["-device", f"{_virtio('virtio-rng', settings)},rng=rng0"]
    argv += ["-device", balloon_option(settings)]
    argv += memory_hotplug_args(spec, settings)
    argv += root_image_args(settings)
    argv += _agent_channel(spec, settings, paths, guest_cid)
    if spec.debug_console and settings.agent_transport == "virtio-serial":
        # its own port on the agent's virtio-serial device; under vsock it is a vsock port
        argv += [
            "-chardev", f"socket,id=debugcon,path={_opt(paths.debug_console)},server=on,wait=off",
            "-device", f"virtserialport,chardev=debugcon,id=debugcon0,name={DEBUG_CONSOLE_PORT}",
        ]  # fmt: skip
    if spec.shared_fs is not None:
        argv += shared_fs_args(spec.shared_fs, settings)
    for placed in devices:
        argv += device_args(placed, settings)
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def accel_option(settings: QemuSettings) -> str:
    """``-accel``: under TCG, with a bound on the translated code QEMU keeps.

    QEMU keeps up to 1 GiB of translated guest code per VM by default, and a
    busy VM's QEMU grows towards it; a bound trades that memory for
    translating again what was flushed.
    """
    if settings.accel == "tcg" and settings.tcg_tb_size:
        return f"tcg,tb-size={settings.tcg_tb_size}"
    return settings.accel


def balloon_option(settings: QemuSettings) -> str:
    """A virtio-balloon that is never inflated, for free page reporting: the guest
    tells QEMU which free pages (2 MiB and up) it holds and QEMU discards them, so
    memory a guest used once and freed goes back to the host (the
    ``husk_vmm_returned_memory_bytes`` metric). A clone's private copy of such a
    page goes and the template's shared one shows through again."""
    return f"{_virtio('virtio-balloon', settings)},id={BALLOON_ID},free-page-reporting=on"


def _seccomp(settings: QemuSettings) -> str:
    """``-sandbox`` options; with ``-runas`` QEMU must still call setuid() once.

    ``-runas`` drops privileges after QEMU opened its devices, which the
    ``elevateprivileges`` filter would kill (SIGSYS). Allowing it costs
    nothing: QEMU has no capabilities left after the drop, so no set*id call
    can raise them again.
    """
    options = settings.seccomp_sandbox.split(",")
    if settings.run_as:
        options = [o for o in options if not o.startswith("elevateprivileges=")]
        options.append("elevateprivileges=allow")
    return ",".join(options)


def hotplug_memory_mib(spec: VmSpec, settings: QemuSettings) -> int:
    """MiB the virtio-mem device can plug beyond the boot memory (0: no device).

    Only q35 has a device-memory region; the room is cut to whole virtio-mem blocks.
    """
    if not settings.pcie:
        return 0
    room = spec.maximum.memory_mib - spec.memory_mib
    return room - room % VIRTIO_MEM_BLOCK_MIB


def smp_option(spec: VmSpec, settings: QemuSettings) -> str:
    """``-smp``: the boot vCPUs, and on q35 (ACPI CPU hot-plug) room up to the maximum."""
    if settings.pcie and spec.maximum.vcpus > spec.vcpus:
        return f"{spec.vcpus},maxcpus={spec.maximum.vcpus}"
    return str(spec.vcpus)


def memory_option(spec: VmSpec, settings: QemuSettings) -> str:
    """``-m``: the boot memory, and ``maxmem`` when memory devices need room: the
    virtio-mem device's and the root image's (both live in q35's device memory)."""
    room = hotplug_memory_mib(spec, settings) + root_image_mib(settings)
    if room:
        return f"{spec.memory_mib}M,maxmem={spec.memory_mib + room}M"
    return f"{spec.memory_mib}M"


def root_image_mib(settings: QemuSettings) -> int:
    """The MiB of device memory the root image takes (0: none): its file's size, a
    whole number of ``ROOT_IMAGE_ALIGN`` (the plugin's config check refuses others)."""
    if not settings.image:
        return 0
    return Path(settings.image).stat().st_size // MiB


def root_image_args(settings: QemuSettings) -> list[str]:
    """The shared root image as a virtio-pmem device the guest mounts with DAX.

    The backend maps the file shared and read-only (QEMU opens it ``O_RDONLY``):
    the guest reads the host's page cache of it, one copy for every VM on the
    host, and nothing a guest does reaches the file. ``share=on`` also keeps it
    out of a template's saved state (``x-ignore-shared``): a clone maps the same
    file.
    """
    if not settings.image:
        return []
    return [
        "-object",
        f"memory-backend-file,id={ROOT_IMAGE_BACKEND},mem-path={_opt(Path(settings.image))},"
        f"size={root_image_mib(settings)}M,share=on,readonly=on",
        "-device", f"virtio-pmem-pci,id={ROOT_IMAGE_ID},memdev={ROOT_IMAGE_BACKEND}",
    ]  # fmt: skip


def memory_hotplug_args(spec: VmSpec, settings: QemuSettings) -> list[str]:
    """One virtio-mem device holding the whole hot-plug room, plugged with nothing at boot.

    Its backend is reserved address space only (``reserve=off``: no swap or
    commit accounting for memory the guest has not been given); ``resize``
    moves ``requested-size`` and the guest driver plugs or unplugs blocks.
    """
    room = hotplug_memory_mib(spec, settings)
    if not room:
        return []
    return [
        "-object", f"memory-backend-ram,id={VIRTIO_MEM_BACKEND},size={room}M,reserve=off",
        "-device",
        f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_BACKEND},requested-size=0,"
        f"block-size={VIRTIO_MEM_BLOCK_MIB}M",
    ]  # fmt: skip


def _memory_backend_option(spec: VmSpec) -> str:
    """``,memory-backend=ram0`` when the guest's RAM is a template's file."""
    return f",memory-backend={TEMPLATE_RAM}" if spec.template is not None else ""


def template_memory_args(spec: VmSpec, readonly_ram: bool = False) -> list[str]:
    """The guest's RAM as the template's memory: the memory itself for the
    template (``share=on``: the RAM is the memfd), a private copy-on-write
    mapping of it for a clone (``share=off``), so clones share every page none
    has written.

    A clone never needs to write it, and one whose QEMU a guest takes over
    must not be able to (every later clone starts from it). ``mem-path`` is a
    memfd sealed against writes once the template is saved
    (``shim.sandbox.ram_holder``): QEMU 7.2 opens it O_RDWR (it does unless
    ``readonly=on``, which also maps the RAM read-only: a ROM the guest cannot
    run on), but every write through that fd fails. Where QEMU can (8.2:
    ``readonly_ram``), the clone also opens it O_RDONLY and still maps it
    writable and private (``readonly=on,rom=off``).
    """
    template = spec.template
    if template is None:
        return []
    share = "on" if template.role == TEMPLATE else "off"
    backend = (
        f"memory-backend-file,id={TEMPLATE_RAM},size={spec.memory_mib}M,"
        f"mem-path={_opt(template.memory)},share={share}"
    )
    if template.role != TEMPLATE and readonly_ram:
        backend += ",readonly=on,rom=off"
    return ["-object", backend]


def _machine(settings: QemuSettings) -> str:
    if settings.machine_type == "microvm":
        # the serial console and an RTC; no legacy PIT/PIC under a modern kernel
        return "microvm,isa-serial=on,rtc=on,pit=off,pic=off"
    return settings.machine_type


def _virtio(kind: str, settings: QemuSettings) -> str:
    """``virtio-x-pci`` on q35, ``virtio-x-device`` (virtio-mmio) on microvm."""
    return f"{kind}-pci" if settings.pcie else f"{kind}-device"


def _opt(path: Path) -> str:
    """A path as a QEMU option value: commas are doubled, as QEMU's parser wants."""
    return str(path).replace(",", ",,")


def _agent_channel(
    spec: VmSpec, settings: QemuSettings, paths: VmPaths, guest_cid: int | None
) -> list[str]:
    if settings.agent_transport == "vsock":
        if guest_cid is None:
            raise InvalidArgumentError(f"sandbox {spec.sandbox_id}: vsock needs a guest CID")
        return ["-device", f"{_virtio('vhost-vsock', settings)},id=vsock0,guest-cid={guest_cid}"]
    if settings.agent_transport != "virtio-serial":
        raise NotSupportedError("qemu", f"agent transport {settings.agent_transport!r}")
    return [
        "-device", f"{_virtio('virtio-serial', settings)},id=serial0",
        "-chardev", f"socket,id=agent,path={_opt(paths.agent)},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,id=agent0,name={AGENT_PORT}",
    ]  # fmt: skip


def shared_fs_args(share: SharedFsDevice, settings: QemuSettings) -> list[str]:
    """``-fsdev`` + the virtio-9p device for a 9p share (virtio-fs is not driven yet)."""
    if share.kind != "9p":
        raise NotSupportedError(
            "qemu",
            f"shared_fs {share.kind!r}",
            'this plugin does not start virtiofsd; use shared_fs = "9p"',
        )
    return [
        "-fsdev", f"local,id=fs-{share.id},path={_opt(share.path)},security_model=none",
        "-device",
        f"{_virtio('virtio-9p', settings)},id={share.id},fsdev=fs-{share.id},mount_tag={share.tag}",
    ]  # fmt: skip


def device_args(placed: Placed, settings: QemuSettings) -> list[str]:
    """The command-line options that cold-plug one device."""
    device = placed.device
    if isinstance(device, BlockDevice):
        return [
            "-blockdev", json.dumps(blockdev_options(device)),
            "-device", json.dumps(block_device_options(device, placed.bus, settings)),
        ]  # fmt: skip
    if isinstance(device, NetDevice):
        return [
            "-netdev", json.dumps(netdev_options(device, fd_names=None)),
            "-device", json.dumps(net_device_options(device, placed.bus, settings)),
        ]  # fmt: skip
    if isinstance(device, SharedFsDevice):
        return shared_fs_args(device, settings)
    if isinstance(device, VsockDevice):
        vsock = _virtio("vhost-vsock", settings)
        return ["-device", f"{vsock},id={device.id},guest-cid={device.guest_cid}"]
    raise NotSupportedError("qemu", f"device {type(device).__name__}")


# --- the dicts shared by the command line and QMP -------------------------------


def node_name(device: BlockDevice) -> str:
    """The block node (format layer) of a disk."""
    return f"drive-{device.id}"


def blockdev_options(device: BlockDevice, filename: str | None = None) -> dict[str, Any]:
    """``blockdev-add`` arguments: a raw/qcow2 format node over a file or host device.

    ``filename`` replaces the disk's path, e.g. ``/dev/fdset/<n>`` for a file the
    shim opened and passed to QEMU (``add-fd``).
    """
    if device.format not in ("raw", "qcow2"):
        raise InvalidArgumentError(
            f"disk {device.id}: format {device.format!r} is not supported (raw or qcow2)"
        )
    return {
        "driver": device.format,
        "node-name": node_name(device),
        "read-only": device.readonly,
        "file": {
            "driver": "host_device" if _is_block_device(device.path) else "file",
            "filename": filename or str(device.path),
            "read-only": device.readonly,
        },
    }


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def block_device_options(
    device: BlockDevice, bus: str | None, settings: QemuSettings
) -> dict[str, Any]:
    """``device_add`` arguments of a virtio-blk disk."""
    options: dict[str, Any] = {
        "driver": _virtio("virtio-blk", settings),
        "id": device.id,
        "drive": node_name(device),
    }
    if device.serial:
        options["serial"] = device.serial
    if bus is not None:
        options["bus"] = bus
    return options


def netdev_id(device: NetDevice) -> str:
    """The backend (netdev) of a NIC."""
    return f"netdev-{device.id}"


def netdev_options(device: NetDevice, fd_names: Sequence[str] | None) -> dict[str, Any]:
    """``netdev_add`` arguments of a tap backend, by ifname or by fds.

    ``fd_names`` are names given to fds with QMP ``getfd``; on the command line
    (``None``) the fds' numbers are used and must be passed to QEMU.
    """
    options: dict[str, Any] = {"type": "tap", "id": netdev_id(device), "vhost": False}
    if device.tap_fds:
        names = list(fd_names) if fd_names is not None else [str(fd) for fd in device.tap_fds]
        if len(names) == 1:
            options["fd"] = names[0]
        else:
            options["fds"] = ":".join(names)
    elif device.tap_name:
        options.update(ifname=device.tap_name, script="no", downscript="no")
    else:
        raise InvalidArgumentError(f"NIC {device.id}: needs a tap name or tap fds")
    return options


def net_device_options(
    device: NetDevice, bus: str | None, settings: QemuSettings
) -> dict[str, Any]:
    """``device_add`` arguments of a virtio-net NIC."""
    options: dict[str, Any] = {
        "driver": _virtio("virtio-net", settings),
        "id": device.id,
        "netdev": netdev_id(device),
        "mac": device.mac,
    }
    if device.mtu != 1500:
        options["host_mtu"] = device.mtu
    if len(device.tap_fds) > 1:
        options["mq"] = True
    if bus is not None:
        options["bus"] = bus
    return options
