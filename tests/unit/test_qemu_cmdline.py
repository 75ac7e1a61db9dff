"""The QEMU command line, compared against expected argv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugins.qemu.cmdline import (
    BASE_KERNEL_PARAMS,
    TCG_KERNEL_PARAMS,
    Placed,
    QemuSettings,
    VmPaths,
    accel_option,
    build_argv,
    device_args,
    kernel_append,
    netdev_options,
)
from plugins.qemu.features import parse_properties
from shim.errors import InvalidArgumentError, NotSupportedError
from shim.hypervisor import (
    CLONE,
    TEMPLATE,
    BlockDevice,
    NetDevice,
    SharedFsDevice,
    TemplateFiles,
    VmSpec,
)

STATE = Path("/run/husk/sb1")
D = "/run/husk/sb1/qemu"


def share(path: Path, kind: str = "9p") -> SharedFsDevice:
    return SharedFsDevice("shared", "kataShared", path, kind)


def spec(**kw: object) -> VmSpec:
    values: dict[str, object] = {
        "sandbox_id": "sb1",
        "state_dir": STATE,
        "vcpus": 2,
        "memory_mib": 256,
        "kernel": Path("/img/vmlinuz"),
        "initrd": Path("/img/initrd.img"),
        "shared_fs": share(STATE / "shared"),
    }
    values.update(kw)
    return VmSpec(**values)  # type: ignore[arg-type]


def test_q35_tcg_virtio_serial_argv() -> None:
    settings = QemuSettings(pcie_root_ports=2, kernel_params="debug")
    argv = build_argv(spec(), settings, VmPaths(STATE / "qemu"), qmp_fd=7)
    assert argv == [
        "/usr/bin/qemu-system-x86_64",
        "-name", "husk-sb1,debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "256M",
        "-pidfile", f"{D}/qemu.pid",
        "-kernel", "/img/vmlinuz", "-initrd", "/img/initrd.img",
        "-append", f"{BASE_KERNEL_PARAMS} {TCG_KERNEL_PARAMS} debug",
        "-fw_cfg", f"name=opt/io.husk/agent-secret,file={D}/agent.secret",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-chardev", f"socket,id=console,path={D}/console.sock,server=on,wait=off",
        "-serial", "chardev:console",
        "-chardev", "socket,id=qmp,fd=7,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=2",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        "-device", "virtio-serial-pci,id=serial0",
        "-chardev", f"socket,id=agent,path={D}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,id=agent0,name=agent.channel.0",
        "-fsdev", "local,id=fs-shared,path=/run/husk/sb1/shared,security_model=none",
        "-device", "virtio-9p-pci,id=shared,fsdev=fs-shared,mount_tag=kataShared",
    ]  # fmt: skip


def test_kvm_vsock_microvm_incoming() -> None:
    settings = QemuSettings(
        machine_type="microvm",
        accel="kvm",
        cpu_model="host",
        pcie_root_ports=0,
        agent_transport="vsock",
    )
    argv = build_argv(
        spec(initrd=None, shared_fs=None),
        settings,
        VmPaths(STATE / "qemu"),
        guest_cid=1234,
        incoming="defer",
    )
    joined = " ".join(argv)
    assert "-machine microvm,isa-serial=on,rtc=on,pit=off,pic=off -accel kvm -cpu host" in joined
    assert "-initrd" not in argv
    assert f"socket,id=qmp,path={D}/qmp.sock,server=on,wait=off" in argv
    assert "vhost-vsock-device,id=vsock0,guest-cid=1234" in argv
    assert "virtio-rng-device,rng=rng0" in argv
    assert "pcie-root-port" not in joined
    assert "virtio-serial" not in joined and "-fsdev" not in argv
    assert argv[-2:] == ["-incoming", "defer"]


def test_vsock_needs_a_cid() -> None:
    with pytest.raises(InvalidArgumentError, match="vsock needs a guest CID"):
        build_argv(spec(), QemuSettings(agent_transport="vsock"), VmPaths(STATE / "qemu"))


def test_virtio_fs_is_refused_with_a_reason() -> None:
    virtio_fs = spec(shared_fs=share(STATE / "shared", "virtio-fs"))
    with pytest.raises(NotSupportedError, match="virtiofsd"):
        build_argv(virtio_fs, QemuSettings(), VmPaths(STATE / "qemu"))


def test_no_share_without_a_shared_fs() -> None:
    argv = build_argv(spec(shared_fs=None), QemuSettings(), VmPaths(STATE / "qemu"))
    assert "-fsdev" not in argv


def test_commas_in_paths_are_doubled() -> None:
    argv = build_argv(spec(shared_fs=share(Path("/a,b"))), QemuSettings(), VmPaths(Path("/s,t")))
    assert "socket,id=console,path=/s,,t/console.sock,server=on,wait=off" in argv
    assert "local,id=fs-shared,path=/a,,b,security_model=none" in argv


def test_kernel_params_not_repeated() -> None:
    settings = QemuSettings(accel="kvm", kernel_params="foo=1")
    assert kernel_append(spec(kernel_params="foo=1"), settings) == BASE_KERNEL_PARAMS + " foo=1"
    assert kernel_append(spec(kernel_params="x"), settings) == BASE_KERNEL_PARAMS + " x foo=1"


def test_speculation_mitigations_are_off_only_on_an_emulated_cpu() -> None:
    assert "mitigations=off" in kernel_append(spec(), QemuSettings(accel="tcg")).split()
    assert "mitigations=off" not in kernel_append(spec(), QemuSettings(accel="kvm")).split()


def test_cold_plugged_disk_and_nic_use_the_qmp_dicts(tmp_path: Path) -> None:
    disk = BlockDevice("blk0", tmp_path / "d.img", readonly=True, serial="s0")
    args = device_args(Placed(disk, "rp0"), QemuSettings())
    assert args[0] == "-blockdev" and args[2] == "-device"
    assert json.loads(args[1]) == {
        "driver": "raw",
        "node-name": "drive-blk0",
        "read-only": True,
        "file": {"driver": "file", "filename": str(tmp_path / "d.img"), "read-only": True},
    }
    assert json.loads(args[3]) == {
        "driver": "virtio-blk-pci",
        "id": "blk0",
        "drive": "drive-blk0",
        "serial": "s0",
        "bus": "rp0",
    }
    nic = NetDevice("net0", "02:00:00:00:00:01", tap_name="tap0", mtu=9000)
    args = device_args(Placed(nic, "rp1"), QemuSettings())
    assert json.loads(args[1]) == {
        "type": "tap",
        "id": "netdev-net0",
        "vhost": False,
        "ifname": "tap0",
        "script": "no",
        "downscript": "no",
    }
    assert json.loads(args[3]) == {
        "driver": "virtio-net-pci",
        "id": "net0",
        "netdev": "netdev-net0",
        "mac": "02:00:00:00:00:01",
        "host_mtu": 9000,
        "bus": "rp1",
    }
    share = device_args(Placed(SharedFsDevice("vol", "voltag", Path("/v"))), QemuSettings())
    assert share[-1] == "virtio-9p-pci,id=vol,fsdev=fs-vol,mount_tag=voltag"


def test_netdev_by_fds() -> None:
    nic = NetDevice("net0", "02:00:00:00:00:01", tap_fds=(5,))
    assert netdev_options(nic, ["fd-net0-0"])["fd"] == "fd-net0-0"
    assert netdev_options(nic, None)["fd"] == "5"
    multi = NetDevice("net1", "02:00:00:00:00:02", tap_fds=(5, 6))
    assert netdev_options(multi, None)["fds"] == "5:6"
    with pytest.raises(InvalidArgumentError, match="needs a tap name or tap fds"):
        netdev_options(NetDevice("net2", "02:00:00:00:00:03"), None)


def test_bad_disk_format() -> None:
    disk = BlockDevice("blk0", Path("/d"), format="vmdk")
    with pytest.raises(InvalidArgumentError, match="format 'vmdk' is not supported"):
        device_args(Placed(disk, "rp0"), QemuSettings())


def test_socket_path_too_long() -> None:
    with pytest.raises(InvalidArgumentError, match="longer than 107 bytes"):
        VmPaths.for_spec(spec(state_dir=Path("/" + "x" * 100)))


def test_settings_from_adjusted_section() -> None:
    section = {
        "path": "/q",
        "machine_type": "q35",
        "accel": "kvm",
        "cpu_model": "host",
        "pcie_root_ports": 3,
        "stop_timeout": 2.5,
    }
    settings = QemuSettings.from_section(section, "vsock")
    assert (settings.binary, settings.accel, settings.cpu_model) == ("/q", "kvm", "host")
    assert settings.root_ports == ["rp0", "rp1", "rp2"]
    assert settings.stop_timeout == 2.5 and settings.agent_transport == "vsock"


def test_runas_drops_to_a_user_and_keeps_the_seccomp_filter_otherwise_whole() -> None:
    argv = build_argv(spec(shared_fs=None), QemuSettings(run_as="nobody"), VmPaths(STATE / "qemu"))
    sandbox = argv[argv.index("-sandbox") + 1]
    assert sandbox == "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=allow"
    assert argv[argv.index("-runas") + 1] == "nobody"


def test_no_seccomp_filter_when_turned_off() -> None:
    argv = build_argv(spec(), QemuSettings(seccomp_sandbox=""), VmPaths(STATE / "qemu"))
    assert "-sandbox" not in argv


def test_debug_console_is_a_second_virtio_serial_port_only_when_asked() -> None:
    paths = VmPaths(STATE / "qemu")
    with_console = build_argv(spec(debug_console=True), QemuSettings(), paths, qmp_fd=7)
    assert f"socket,id=debugcon,path={D}/debug-console.sock,server=on,wait=off" in with_console
    assert "virtserialport,chardev=debugcon,id=debugcon0,name=console.channel.0" in with_console
    without = build_argv(spec(), QemuSettings(), paths, qmp_fd=7)
    assert not [a for a in without if "debugcon" in a]
    vsock = QemuSettings(agent_transport="vsock")
    assert not [a for a in build_argv(spec(debug_console=True), vsock, paths, guest_cid=9)
                if "debugcon" in a]  # fmt: skip


def test_room_to_grow_is_maxcpus_maxmem_and_one_empty_virtio_mem_device() -> None:
    argv = build_argv(
        spec(max_vcpus=4, max_memory_mib=1281), QemuSettings(), VmPaths(STATE / "qemu")
    )
    assert argv[argv.index("-smp") + 1] == "2,maxcpus=4"
    # the room (1025 MiB) is cut to whole 2 MiB virtio-mem blocks
    assert argv[argv.index("-m") + 1] == "256M,maxmem=1280M"
    assert "memory-backend-ram,id=vmem0-ram,size=1024M,reserve=off" in argv
    assert "virtio-mem-pci,id=vmem0,memdev=vmem0-ram,requested-size=0,block-size=2M" in argv


def test_no_room_no_maxima_and_no_virtio_mem() -> None:
    argv = build_argv(
        spec(max_vcpus=1, max_memory_mib=128), QemuSettings(), VmPaths(STATE / "qemu")
    )
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-m") + 1] == "256M"
    assert not any("virtio-mem" in a for a in argv)


def test_microvm_has_no_hotplug_room() -> None:
    settings = QemuSettings(machine_type="microvm", pcie_root_ports=0)
    argv = build_argv(spec(max_vcpus=4, max_memory_mib=4096), settings, VmPaths(STATE / "qemu"))
    assert (argv[argv.index("-smp") + 1], argv[argv.index("-m") + 1]) == ("2", "256M")


def test_guest_onlines_hotplugged_memory_as_movable_without_bounce_buffers() -> None:
    for param in (
        "memhp_default_state=online",
        "memory_hotplug.online_policy=auto-movable",
        "swiotlb=noforce",
    ):
        assert param in BASE_KERNEL_PARAMS.split()


def _ram_backend(argv: list[str]) -> str:
    return next(a for a in argv if a.startswith("memory-backend-file,id=ram0"))


def test_a_clone_opens_the_template_memory_read_only_where_qemu_can_map_it_writable() -> None:
    files = TemplateFiles(memory=Path("/run/husk-template/memory"), state=Path("/s"), role=CLONE)
    argv = build_argv(spec(template=files), QemuSettings(), VmPaths(Path(D)), readonly_ram=True)
    assert _ram_backend(argv).endswith(",share=off,readonly=on,rom=off")


def test_without_rom_off_a_clone_keeps_its_ram_writable() -> None:
    # QEMU 7.2: readonly=on would map the guest's RAM read-only (a ROM)
    files = TemplateFiles(memory=Path("/run/husk-template/memory"), state=Path("/s"), role=CLONE)
    argv = build_argv(spec(template=files), QemuSettings(), VmPaths(Path(D)), readonly_ram=False)
    assert _ram_backend(argv).endswith(",share=off")


def test_the_template_vm_writes_its_memory_file() -> None:
    files = TemplateFiles(memory=Path("/run/husk-template/memory"), state=Path("/s"), role=TEMPLATE)
    argv = build_argv(spec(template=files), QemuSettings(), VmPaths(Path(D)), readonly_ram=True)
    assert _ram_backend(argv).endswith(",share=on")


def test_memory_backend_file_properties_come_from_qemus_help() -> None:
    qemu_7_2 = (
        "memory-backend-file options:\n  align=<int>\n  readonly=<bool>\n  share=<bool> - x\n"
    )
    qemu_8_2 = qemu_7_2 + "  rom=<OnOffAuto>       - Whether to create Read Only Memory (ROM)\n"
    assert parse_properties(qemu_7_2) == {"align", "readonly", "share"}
    assert "rom" in parse_properties(qemu_8_2)


def test_a_tcg_translation_cache_bound_reaches_qemu() -> None:
    assert accel_option(QemuSettings(accel="tcg", tcg_tb_size=128)) == "tcg,tb-size=128"


def test_the_translation_cache_bound_means_nothing_under_kvm() -> None:
    assert accel_option(QemuSettings(accel="kvm", tcg_tb_size=128)) == "kvm"


def test_without_a_bound_qemu_keeps_its_own_default() -> None:
    assert accel_option(QemuSettings(accel="tcg")) == "tcg"


def test_the_root_image_is_a_read_only_shared_pmem_device_with_room_in_maxmem(
    tmp_path: Path,
) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * (52 * 1024 * 1024))
    argv = build_argv(
        spec(max_vcpus=2, max_memory_mib=256), QemuSettings(image=str(image)), VmPaths(STATE)
    )
    assert argv[argv.index("-m") + 1] == "256M,maxmem=308M"
    backend = f"memory-backend-file,id=rootimg-mem,mem-path={image},size=52M,share=on,readonly=on"
    assert backend in argv
    assert "virtio-pmem-pci,id=rootimg,memdev=rootimg-mem" in argv


def test_the_root_image_shares_device_memory_with_the_virtio_mem_room(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * (4 * 1024 * 1024))
    argv = build_argv(
        spec(max_memory_mib=1280), QemuSettings(image=str(image)), VmPaths(STATE / "qemu")
    )
    assert argv[argv.index("-m") + 1] == "256M,maxmem=1284M"


def test_no_image_no_pmem_device() -> None:
    argv = build_argv(spec(), QemuSettings(), VmPaths(STATE / "qemu"))
    assert not any("pmem" in a or "rootimg" in a for a in argv)
