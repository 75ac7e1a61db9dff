"""How big a sandbox VM must be: Kata's rule, the configured maxima, and containers' limits.

A sandbox VM has ``default_vcpus`` plus its containers' CPU limits (each
``ceil(quota / period)``) and ``default_memory`` plus their memory limits. A
container without a limit adds nothing: it shares the defaults.

A pod may declare its total up front: containerd (1.6+) puts the sum of the
pod's container limits on the pause container as CRI annotations
(``io.kubernetes.cri.sandbox-cpu-quota``/``-cpu-period``/``-memory``) when the
kubelet sends pod resources. That total is reserved when the VM boots, and the
pod's containers are counted against it, so they grow the VM only past what
the pod declared: the VM gets ``default + max(pod total, sum of limits)``.

The VM may never grow past ``default_maxvcpus``/``default_maxmemory``
(``VmSpec.maximum``); asking for more fails in one line naming the key, before
anything changes. Limits that cgroups would refuse (a negative memory limit
other than -1, a quota or period outside the kernel's range) fail the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent_proto import oci_pb2
from shim.errors import InvalidArgumentError
from shim.hypervisor import VmSize

MIB = 1 << 20
#: the CFS period cgroups use when a spec gives a quota without one (µs)
DEFAULT_PERIOD = 100_000
#: the kernel's bounds for cpu.max: quota at least 1 ms, period 1 ms .. 1 s
MIN_QUOTA = 1_000
PERIOD_RANGE = (1_000, 1_000_000)

#: what containerd's CRI plugin puts on a pod's pause container (pkg/cri/annotations)
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"

NOTHING = VmSize(0, 0)


def vcpus_for(quota: int, period: int) -> int:
    """Kata's rule: a CFS quota needs ``ceil(quota / period)`` whole vCPUs (0: no limit)."""
    return math.ceil(quota / (period or DEFAULT_PERIOD)) if quota > 0 else 0


def mib_for(limit: int) -> int:
    """A memory limit in bytes as whole MiB (0: no limit)."""
    return math.ceil(limit / MIB) if limit > 0 else 0


def check_cpu(quota: int, period: int, what: str) -> None:
    """Refuse a quota or period cgroups would refuse; -1 and 0 mean "no limit"."""
    if quota < -1 or 0 < quota < MIN_QUOTA:
        raise InvalidArgumentError(
            f"{what}: cpu quota {quota} is invalid: use -1 for no limit or at least {MIN_QUOTA} µs"
        )
    low, high = PERIOD_RANGE
    if period and not low <= period <= high:
        raise InvalidArgumentError(
            f"{what}: cpu period {period} is out of range: use {low} to {high} µs"
        )


def check_memory(limit: int, what: str) -> None:
    """Refuse a negative memory limit other than -1 ("no limit")."""
    if limit < -1:
        raise InvalidArgumentError(
            f"{what}: memory limit {limit} is invalid: use -1 for no limit or a size in bytes"
        )


def container_limits(resources: oci_pb2.LinuxResources, what: str) -> VmSize:
    """What one container adds to its VM: vCPUs for its CPU quota, MiB for its memory limit."""
    cpu, memory = resources.CPU, resources.Memory
    check_cpu(cpu.Quota, cpu.Period, what)
    check_memory(memory.Limit, what)
    return VmSize(vcpus_for(cpu.Quota, cpu.Period), mib_for(memory.Limit))


def updated_limits(current: VmSize, resources: oci_pb2.LinuxResources, what: str) -> VmSize:
    """A container's limits after an ``Update``: what the update sets, the rest as it was."""
    new = container_limits(resources, what)
    vcpus = new.vcpus if resources.CPU.Quota else current.vcpus
    memory = new.memory_mib if resources.Memory.Limit else current.memory_mib
    return VmSize(vcpus, memory)


def pod_reservation(annotations: Mapping[str, Any], what: str) -> VmSize:
    """The pod's declared total from the CRI sandbox annotations (nothing if absent)."""

    def number(key: str) -> int:
        value = annotations.get(key)
        if value in (None, ""):
            return 0
        try:
            return int(str(value))
        except ValueError:
            raise InvalidArgumentError(
                f"{what}: annotation {key}={value!r} is not an integer"
            ) from None

    quota, period, memory = (
        number(k) for k in (SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD, SANDBOX_MEMORY)
    )
    check_cpu(quota, period, f"{what} (annotation {SANDBOX_CPU_QUOTA})")
    check_memory(memory, f"{what} (annotation {SANDBOX_MEMORY})")
    return VmSize(vcpus_for(quota, period), mib_for(memory))


class VmSizing:
    """The sizes a sandbox's containers claim, and the VM size that follows from them."""

    def __init__(self, sandbox_id: str, base: VmSize, maximum: VmSize, section: str) -> None:
        self.sandbox_id = sandbox_id
        #: ``default_vcpus``/``default_memory``
        self.base = base
        #: ``default_maxvcpus``/``default_maxmemory``
        self.maximum = maximum
        #: the config section the keys live in, for messages (``[hypervisor.qemu]``)
        self.section = section
        #: the pod's declared total (CRI annotations), reserved from boot
        self.pod = NOTHING
        self.claims: dict[str, VmSize] = {}

    def wanted(self, claims: Mapping[str, VmSize] | None = None) -> VmSize:
        """``default + max(pod total, sum of the containers' limits)``, per resource."""
        claims = self.claims if claims is None else claims
        vcpus = sum(c.vcpus for c in claims.values())
        memory = sum(c.memory_mib for c in claims.values())
        return VmSize(
            self.base.vcpus + max(self.pod.vcpus, vcpus),
            self.base.memory_mib + max(self.pod.memory_mib, memory),
        )

    def wanted_with(self, container_id: str, limits: VmSize, what: str) -> VmSize:
        """The size with ``container_id`` claiming ``limits``; InvalidArgument above a maximum."""
        size = self.wanted({**self.claims, container_id: limits})
        self.check(size, what)
        return size

    def check(self, size: VmSize, what: str) -> None:
        """Refuse a size above the maxima, naming the key and where it is set.

        InvalidArgument rather than ResourceExhausted: containerd 1.6 passes the
        former on as "invalid argument" and turns the latter into "unknown".
        """
        for have, limit, unit, default, key in (
            (size.vcpus, self.maximum.vcpus, "vCPUs", "default_vcpus", "default_maxvcpus"),
            (
                size.memory_mib,
                self.maximum.memory_mib,
                "MiB",
                "default_memory",
                "default_maxmemory",
            ),
        ):
            if have > limit:
                raise InvalidArgumentError(
                    f"sandbox {self.sandbox_id}: {what} needs a VM of {have} {unit} "
                    f"({default} plus the containers' limits), above {key} = {limit} "
                    f"in {self.section}"
                )
