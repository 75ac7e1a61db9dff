"""Cheap facts about this host that config defaults depend on.

``HostFacts.probe()`` reads only files (no subprocess), so loading the config
stays fast; ``shim.cli.check`` runs the slower probes (binary versions) for
``husk check``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

VHOST_VSOCK = Path("/dev/vhost-vsock")
KVM = Path("/dev/kvm")


@dataclass(frozen=True)
class HostFacts:
    """What the host offers a sandbox VM."""

    kvm_device: bool
    kvm_hardware: bool
    vhost_vsock: bool
    #: CPUs this process may run on, and the host's memory in MiB (0: unknown)
    cpus: int = 1
    memory_mib: int = 0

    @property
    def kvm_usable(self) -> bool:
        """KVM can boot a stock kernel: the device is there *and* the CPU has vmx/svm.

        A paravirtual /dev/kvm without hardware virtualisation behind it exists
        on some cloud machines and cannot boot a stock kernel, so the device
        alone is not enough.
        """
        return self.kvm_device and self.kvm_hardware

    @property
    def kvm_reason(self) -> str:
        """Why KVM is or is not used, in words."""
        if self.kvm_usable:
            return "KVM usable (hardware virtualisation and /dev/kvm)"
        if self.kvm_device:
            return (
                "KVM present but unusable, TCG will be used: /dev/kvm exists but the "
                "CPU reports no hardware virtualisation (vmx/svm)"
            )
        if self.kvm_hardware:
            return "KVM unusable, TCG will be used: the CPU has vmx/svm but /dev/kvm is missing"
        return "KVM unavailable, TCG will be used: no /dev/kvm and no vmx/svm"

    @classmethod
    def probe(
        cls, cpuinfo: Path = Path("/proc/cpuinfo"), meminfo: Path = Path("/proc/meminfo")
    ) -> HostFacts:
        """Read the facts from this host."""
        return cls(
            kvm_device=KVM.exists() and os.access(KVM, os.R_OK | os.W_OK),
            kvm_hardware=_cpu_has_virt(cpuinfo),
            vhost_vsock=VHOST_VSOCK.exists() and os.access(VHOST_VSOCK, os.R_OK | os.W_OK),
            cpus=len(os.sched_getaffinity(0)),
            memory_mib=_memory_mib(meminfo),
        )


def _cpu_has_virt(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"vmx", "svm"})
    return False


def _memory_mib(meminfo: Path) -> int:
    try:
        text = meminfo.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            return int(fields[1]) // 1024 if len(fields) > 1 and fields[1].isdigit() else 0
    return 0
