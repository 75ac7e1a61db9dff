"""The ``[hypervisor.builtin]`` section and factory.

The built-in VMM runs inside the shim process on /dev/kvm, as Kata's Dragonball
does, so it has no binary of its own and needs usable KVM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shim.errors import NotSupportedError
from shim.host import HostFacts
from shim.hypervisor import Hypervisor, HypervisorPlugin
from shim.hypervisor_keys import common_keys
from shim.schema import Key

KEYS: tuple[Key, ...] = tuple(k for k in common_keys("") if k.name != "path")


class BuiltinPlugin(HypervisorPlugin):
    """An in-process VMM on /dev/kvm, reached through hybrid vsock."""

    name = "builtin"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS

    def agent_transports(self, host: HostFacts) -> Sequence[str]:
        return ("hybrid-vsock",)

    def validate(self, values: Mapping[str, Any], host: HostFacts) -> list[tuple[str, str]]:
        if values["shared_fs"] == "9p":
            return [("shared_fs", 'the built-in VMM has no 9p; use "virtio-fs" or "none"')]
        return []

    def unmet_requirements(self, values: Mapping[str, Any], host: HostFacts) -> list[str]:
        problems = super().unmet_requirements(values, host)
        if not host.kvm_usable:
            problems.append("the built-in VMM needs usable KVM: " + host.kvm_reason)
        return problems

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        raise NotSupportedError(
            self.name, "starting a sandbox", "the built-in VMM is not built yet"
        )


PLUGIN = BuiltinPlugin()
