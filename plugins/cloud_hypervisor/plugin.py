"""The ``[hypervisor.cloud-hypervisor]`` section and factory.

Cloud Hypervisor needs KVM and exposes the guest's vsock as a hybrid-vsock unix
socket, so the agent is always reached through ``CONNECT <port>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shim.errors import NotSupportedError
from shim.host import HostFacts
from shim.hypervisor import Hypervisor, HypervisorPlugin
from shim.hypervisor_keys import common_keys
from shim.schema import Key

KEYS: tuple[Key, ...] = (
    *common_keys("/usr/bin/cloud-hypervisor"),
    Key("api_timeout", float, 5.0, "seconds for one REST call on the API socket", minimum=0.1),
)


class CloudHypervisorPlugin(HypervisorPlugin):
    """Cloud Hypervisor over its REST API on a unix socket."""

    name = "cloud-hypervisor"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS

    def agent_transports(self, host: HostFacts) -> Sequence[str]:
        return ("hybrid-vsock",)

    def validate(self, values: Mapping[str, Any], host: HostFacts) -> list[tuple[str, str]]:
        if values["shared_fs"] == "9p":
            return [("shared_fs", 'Cloud Hypervisor has no 9p; use "virtio-fs" or "none"')]
        return []

    def unmet_requirements(self, values: Mapping[str, Any], host: HostFacts) -> list[str]:
        problems = super().unmet_requirements(values, host)
        if not host.kvm_usable:
            problems.append("Cloud Hypervisor needs usable KVM: " + host.kvm_reason)
        return problems

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        raise NotSupportedError(
            self.name, "starting a sandbox", "the Cloud Hypervisor driver is not built yet"
        )


PLUGIN = CloudHypervisorPlugin()
