"""The ``[hypervisor.builtin]`` section and factory.

The built-in VMM runs inside the shim process on /dev/kvm, as Kata's Dragonball
does, so it has no binary of its own and needs usable KVM.
"""

from __future__ import annotations

from collections.abc import Sequence

from shim.config.hypervisor_keys import common_keys
from shim.config.schema import Key
from shim.hypervisor import HybridVsockKvmPlugin

KEYS: tuple[Key, ...] = tuple(k for k in common_keys("", "virtio-fs") if k.name != "path")


class BuiltinPlugin(HybridVsockKvmPlugin):
    """An in-process VMM on /dev/kvm, reached through hybrid vsock."""

    label = "the built-in VMM"
    name = "builtin"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS


PLUGIN = BuiltinPlugin()
