"""Config keys every ``[hypervisor.<name>]`` section shares.

A plugin lists these first and adds its own; defaults point at the guest image
that ``husk image build`` writes.
"""

from __future__ import annotations

from shim.config.schema import Key

DEFAULT_IMAGE_DIR = "/var/lib/husk/images"


def common_keys(binary: str, shared_fs: str = "9p") -> tuple[Key, ...]:
    """The shared keys; ``path`` and ``shared_fs`` default to the plugin's own."""
    return (
        Key("path", str, binary, "the VMM binary"),
        Key(
            "kernel",
            str,
            f"{DEFAULT_IMAGE_DIR}/vmlinux",
            "guest kernel (uncompressed: QEMU boots it directly)",
        ),
        Key("initrd", str, f"{DEFAULT_IMAGE_DIR}/initrd.img", "guest initrd ('' for none)"),
        Key("kernel_params", str, "", "extra guest kernel command line"),
        Key("default_vcpus", int, 1, "vCPUs of a sandbox", minimum=1, maximum=255),
        Key("default_memory", int, 512, "MiB of memory of a sandbox", minimum=64),
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
    )
