"""Config keys every ``[hypervisor.<name>]`` section shares.

A plugin lists these first and adds its own; defaults point at the guest image
that ``husk image build`` writes. The loader resolves the maxima (``0``: from
the host) with ``adjust_common`` and checks them with ``validate_common``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shim.config.schema import Key
from shim.host import HostFacts

#: the most vCPUs a sandbox may have (QEMU's q35 without an IOMMU stops at 255 APIC ids)
MAX_VCPUS = 255

DEFAULT_IMAGE_DIR = "/var/lib/husk/images"

#: the keys a pod may set for its own VM with an ``io.husk.config.hypervisor.<key>``
#: annotation, where ``enable_annotations`` allows it (Kata's rule)
ANNOTATABLE = ("default_vcpus", "default_memory")


def common_keys(
    binary: str, shared_fs: str = "9p", initrd: str = f"{DEFAULT_IMAGE_DIR}/initrd.img"
) -> tuple[Key, ...]:
    """The shared keys; ``path``, ``shared_fs`` and ``initrd`` default to the plugin's own."""
    return (
        Key("path", str, binary, "the VMM binary"),
        Key(
            "kernel",
            str,
            f"{DEFAULT_IMAGE_DIR}/vmlinux",
            "guest kernel (uncompressed: QEMU boots it directly)",
        ),
        Key("initrd", str, initrd, "guest initrd ('' for none)"),
        Key("kernel_params", str, "", "extra guest kernel command line"),
        Key("default_vcpus", int, 1, "vCPUs of a sandbox", minimum=1, maximum=255),
        Key("default_memory", int, 512, "MiB of memory of a sandbox", minimum=64),
        Key(
            "default_maxvcpus",
            int,
            0,
            "the most vCPUs a sandbox may grow to; 0: the host's CPUs plus default_vcpus",
            minimum=0,
            maximum=MAX_VCPUS,
        ),
        Key(
            "default_maxmemory",
            int,
            0,
            "the most MiB a sandbox may grow to; 0: the host's memory",
            minimum=0,
        ),
        Key(
            "shared_fs",
            str,
            shared_fs,
            "how the container rootfs is shared into the guest",
            choices=("9p", "virtio-fs", "none"),
        ),
        Key(
            "boot_timeout",
            float,
            30.0,
            "seconds for the VMM to start and answer its control socket",
            minimum=1,
        ),
        Key("stop_timeout", float, 10.0, "seconds for each step of a graceful stop", minimum=0.1),
        Key("enable_debug", bool, False, "VMM debug output in the sandbox's log"),
        Key(
            "enable_annotations",
            list,
            [],
            "keys a pod may set with io.husk.config.hypervisor.<key> annotations",
            choices=ANNOTATABLE,
        ),
    )


def adjust_common(values: dict[str, Any], host: HostFacts) -> dict[str, Any]:
    """Resolve ``default_maxvcpus``/``default_maxmemory`` = 0 for this host.

    vCPUs: the host's CPUs on top of ``default_vcpus``, so containers whose
    limits add up to every host CPU fit beside the sandbox's own (a vCPU is a
    thread; more of them than host CPUs only shares the same CPUs). Memory: the
    host's, as Kata; a sandbox asking for more could never have it.
    """
    if values.get("default_maxvcpus") == 0:
        values["default_maxvcpus"] = min(MAX_VCPUS, host.cpus + int(values["default_vcpus"]))
    if values.get("default_maxmemory") == 0:
        values["default_maxmemory"] = max(host.memory_mib, int(values["default_memory"]))
    return values


def validate_common(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A maximum below its default is a mistake the operator should hear about."""
    problems = []
    for maximum, default, zero in (
        ("default_maxvcpus", "default_vcpus", "the host's CPUs plus default_vcpus"),
        ("default_maxmemory", "default_memory", "the host's memory"),
    ):
        if 0 < int(values.get(maximum, 0)) < int(values[default]):
            problems.append((maximum, f"below {default} ({values[default]}); use 0 for {zero}"))
    return problems
