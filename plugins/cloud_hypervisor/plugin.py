"""The ``[hypervisor.cloud-hypervisor]`` section and the factory the registry calls.

Cloud Hypervisor needs hardware KVM, shares host directories over virtio-fs
(each share served by a ``virtiofsd``) and exposes the guest's vsock as a
hybrid-vsock unix socket, so the agent is always reached through ``CONNECT
<port>``. What a host lacks for it is reported by ``unmet_requirements``:
``husk check`` prints it and a sandbox start refuses on it, in one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shim.config.hypervisor_keys import common_keys
from shim.config.schema import Key
from shim.host import HostFacts
from shim.hypervisor import HybridVsockKvmPlugin, Hypervisor

#: where virtiofsd is found for ``virtiofsd = "auto"``, first match wins: the Rust
#: daemon (Debian 13's ``virtiofsd`` package), then QEMU's own (Debian 12's
#: ``qemu-system-common``); the first is named when neither is there
VIRTIOFSD_PLACES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
DEFAULT_VIRTIOFSD = VIRTIOFSD_PLACES[0]

KEYS: tuple[Key, ...] = (
    *common_keys("/usr/bin/cloud-hypervisor", "virtio-fs"),
    Key(
        "virtiofsd",
        str,
        "auto",
        'virtiofsd binary, for shared_fs = "virtio-fs"; auto: the first installed of '
        + ", ".join(VIRTIOFSD_PLACES),
    ),
    Key(
        "seccomp",
        str,
        "true",
        "Cloud Hypervisor's own seccomp filters (--seccomp): true, log (report only) or false",
        choices=("true", "log", "false"),
    ),
    Key("api_timeout", float, 30.0, "seconds for one request on the API socket", minimum=0.1),
)


def kvm_problem(host: HostFacts) -> str | None:
    """What keeps Cloud Hypervisor from KVM on this host, in words (None: nothing)."""
    if host.kvm_usable:
        return None
    if host.kvm_device:
        return (
            "Cloud Hypervisor needs hardware KVM: /dev/kvm is there but the CPU reports "
            "no hardware virtualisation (vmx/svm)"
        )
    if host.kvm_hardware:
        return "Cloud Hypervisor needs /dev/kvm: the CPU has vmx/svm but /dev/kvm is missing"
    return "Cloud Hypervisor needs KVM: no /dev/kvm and no hardware virtualisation (vmx/svm)"


def virtiofsd_problem(values: Mapping[str, Any]) -> str | None:
    """A missing virtiofsd, where the section shares the rootfs over virtio-fs."""
    binary = str(values.get("virtiofsd", DEFAULT_VIRTIOFSD))
    if values.get("shared_fs") != "virtio-fs":
        return None
    if Path(binary).is_file() and os.access(binary, os.X_OK):
        return None
    return f"virtiofsd binary {binary} not found or not executable (key 'virtiofsd')"


class CloudHypervisorPlugin(HybridVsockKvmPlugin):
    """Cloud Hypervisor, driven over its REST API on a unix socket."""

    label = "Cloud Hypervisor"
    name = "cloud-hypervisor"

    @property
    def keys(self) -> Sequence[Key]:
        return KEYS

    def adjust(self, values: dict[str, Any], host: HostFacts) -> dict[str, Any]:
        if values["virtiofsd"] == "auto":
            found = [p for p in VIRTIOFSD_PLACES if Path(p).is_file()]
            values["virtiofsd"] = found[0] if found else DEFAULT_VIRTIOFSD
        return values

    def unmet_requirements(self, values: Mapping[str, Any], host: HostFacts) -> list[str]:
        # the base class checks the binary, kernel and initrd; KVM and virtiofsd in our words
        problems = super(HybridVsockKvmPlugin, self).unmet_requirements(values, host)
        for problem in (kvm_problem(host), virtiofsd_problem(values)):
            if problem is not None:
                problems.append(problem)
        return problems

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        from plugins.cloud_hypervisor.driver import CloudHypervisor

        return CloudHypervisor(config)


PLUGIN = CloudHypervisorPlugin()
