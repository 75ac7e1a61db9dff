"""The ``[hypervisor.qemu]`` section and the factory the registry calls."""

from __future__ import annotations

import pwd
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from plugins.qemu.cmdline import ROOT_IMAGE_ALIGN, SECCOMP_SANDBOX
from shim.config.hypervisor_keys import DEFAULT_IMAGE_DIR, common_keys
from shim.config.schema import Key
from shim.host import HostFacts
from shim.hypervisor import Hypervisor, HypervisorPlugin

#: the initramfs ``husk image build`` writes to mount ``root.img`` (and nothing else)
LOADER_INITRD = "root-initrd.img"

KEYS: tuple[Key, ...] = (
    *common_keys("/usr/bin/qemu-system-x86_64", initrd=f"{DEFAULT_IMAGE_DIR}/{LOADER_INITRD}"),
    Key(
        "image",
        str,
        f"{DEFAULT_IMAGE_DIR}/root.img",
        "guest root filesystem mapped read-only and shared by every VM (virtio-pmem, DAX); "
        "'' boots the initrd alone",
    ),
    Key("machine_type", str, "q35", "QEMU machine", choices=("q35", "microvm")),
    Key(
        "accel",
        str,
        "auto",
        "auto: KVM where hardware virtualisation is usable, else TCG",
        choices=("auto", "kvm", "tcg"),
    ),
    Key("pcie_root_ports", int, 4, "root ports reserved for hot-plug (q35)", minimum=0, maximum=32),
    Key("cpu_model", str, "auto", "-cpu model; auto: host under KVM, max under TCG"),
    Key(
        "tcg_tb_size",
        int,
        0,
        "MiB of translated code QEMU keeps under TCG; 0: QEMU's default (1 GiB)",
        minimum=0,
        maximum=4096,
    ),
    Key(
        "seccompsandbox",
        str,
        SECCOMP_SANDBOX,
        "QEMU's -sandbox (seccomp) options; '' for none",
    ),
    Key("run_as", str, "", "user QEMU drops to once its files are open; '' stays root"),
)


def _image_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The root image and the initrd have to match: the loader needs the image."""
    image, initrd = values["image"], values["initrd"]
    if not image:
        if Path(initrd).name == LOADER_INITRD:
            whole = f"{DEFAULT_IMAGE_DIR}/initrd.img"
            return [
                ("initrd", f"{initrd} only mounts a root image: set image, or initrd = {whole}")
            ]
        return []
    problems = []
    if values["machine_type"] == "microvm":
        problems.append(
            (
                "image",
                'microvm has no PCI for its virtio-pmem device; set image = "" '
                f'and initrd = "{DEFAULT_IMAGE_DIR}/initrd.img", or use q35',
            )
        )
    if not initrd:
        problems.append(
            (
                "initrd",
                f"the root image {image} needs the initramfs that mounts it "
                f"({DEFAULT_IMAGE_DIR}/{LOADER_INITRD})",
            )
        )
    try:
        size = Path(image).stat().st_size
    except OSError:
        return problems  # a missing file is a host requirement (husk check), not a config error
    if size == 0 or size % ROOT_IMAGE_ALIGN:
        problems.append(
            (
                "image",
                f"{image} is {size} bytes: a root image is a non-empty "
                "multiple of 2 MiB (husk image build pads it)",
            )
        )
    return problems


class QemuPlugin(HypervisorPlugin):
    """QEMU: q35 or microvm, KVM or TCG, vsock or virtio-serial for the agent."""

    name = "qemu"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS

    def adjust(self, values: dict[str, Any], host: HostFacts) -> dict[str, Any]:
        if values["accel"] == "auto":
            values["accel"] = "kvm" if host.kvm_usable else "tcg"
        if values["cpu_model"] == "auto":
            values["cpu_model"] = "host" if values["accel"] == "kvm" else "max"
        return values

    def validate(self, values: Mapping[str, Any], host: HostFacts) -> list[tuple[str, str]]:
        problems = []
        if values["accel"] == "kvm" and not host.kvm_usable:
            problems.append(("accel", host.kvm_reason + '; use "auto" or "tcg"'))
        if values["run_as"]:
            try:
                pwd.getpwnam(values["run_as"])
            except KeyError:
                problems.append(("run_as", "no such user on this host"))
            if values["shared_fs"] == "9p":
                problems.append(
                    (
                        "run_as",
                        'needs shared_fs = "none": over 9p QEMU would read and write every '
                        "container file as that user",
                    )
                )
        if values["shared_fs"] == "virtio-fs":
            problems.append(
                ("shared_fs", 'the qemu plugin does not start virtiofsd yet; use "9p" or "none"')
            )
        problems += _image_problems(values)
        if values["machine_type"] == "microvm" and values["pcie_root_ports"]:
            problems.append(
                ("pcie_root_ports", "microvm has no PCIe root ports; set it to 0 or use q35")
            )
        return problems

    def agent_transports(self, host: HostFacts) -> Sequence[str]:
        return ("vsock", "virtio-serial") if host.vhost_vsock else ("virtio-serial",)

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        from plugins.qemu.driver import QemuHypervisor

        return QemuHypervisor(config)


PLUGIN = QemuPlugin()
