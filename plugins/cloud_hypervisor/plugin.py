"""The ``[hypervisor.cloud-hypervisor]`` section and factory.

Cloud Hypervisor needs KVM and exposes the guest's vsock as a hybrid-vsock unix
socket, so the agent is always reached through ``CONNECT <port>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from shim.config.hypervisor_keys import common_keys
from shim.config.schema import Key
from shim.hypervisor import HybridVsockKvmPlugin

KEYS: tuple[Key, ...] = common_keys("/usr/bin/cloud-hypervisor", "virtio-fs")


class CloudHypervisorPlugin(HybridVsockKvmPlugin):
    """Cloud Hypervisor over its REST API on a unix socket."""

    label = "Cloud Hypervisor"
    name = "cloud-hypervisor"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS


PLUGIN = CloudHypervisorPlugin()
