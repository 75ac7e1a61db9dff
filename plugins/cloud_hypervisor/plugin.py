"""The ``[hypervisor.cloud-hypervisor]`` section and factory.

Cloud Hypervisor needs KVM and exposes the guest's vsock as a hybrid-vsock unix
socket, so the agent is always reached through ``CONNECT <port>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shim.config.hypervisor_keys import common_keys
from shim.config.schema import Key
from shim.errors import NotSupportedError
from shim.hypervisor import HybridVsockKvmPlugin, Hypervisor

KEYS: tuple[Key, ...] = (
    *common_keys("/usr/bin/cloud-hypervisor"),
    Key("api_timeout", float, 5.0, "seconds for one REST call on the API socket", minimum=0.1),
)


class CloudHypervisorPlugin(HybridVsockKvmPlugin):
    """Cloud Hypervisor over its REST API on a unix socket."""

    label = "Cloud Hypervisor"
    name = "cloud-hypervisor"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        raise NotSupportedError(
            self.name, "starting a sandbox", "the Cloud Hypervisor driver is not built yet"
        )


PLUGIN = CloudHypervisorPlugin()
