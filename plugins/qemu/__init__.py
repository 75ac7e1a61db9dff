"""The QEMU hypervisor plugin (Debian's ``qemu-system-x86``); registers as ``qemu``."""

from plugins.qemu.plugin import PLUGIN, QemuPlugin
from shim.registry import register

register(PLUGIN)

__all__ = ["PLUGIN", "QemuPlugin"]
