"""What one scrape reads from a sandbox: the VMM's process, the guest, each container.

Everything is read at scrape time, within :data:`SCRAPE_TIMEOUT`: the VMM's
CPU seconds and RSS from ``/proc/<pid>`` of the process the hypervisor plugin
names (``Hypervisor.vmm_pid``), the guest's memory and CPU from the agent's
``GetMetrics`` and each running container's cgroup from ``StatsContainer``.
A part that cannot be read (an older agent without ``GetMetrics``, a container
going away) is left out; the scrape still answers.

The guest is hostile: its ``GetMetrics`` text is parsed with a size bound and
only the families, label names and label values husk's agent sends are kept,
each series once (the first sample of it): whatever the guest writes, a scrape
shows at most the series husk's agent defines.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from agent_proto import agent_pb2
from shim.errors import HuskError
from ttrpc import ConnectionClosed, RpcError

if TYPE_CHECKING:
    from shim.sandbox.sandbox import Sandbox

log = logging.getLogger("husk.metrics")

#: seconds one scrape may spend asking the agent
SCRAPE_TIMEOUT = 5.0
#: the largest guest text considered, and the most samples kept from it
GUEST_TEXT_LIMIT = 64 * 1024
GUEST_SAMPLE_LIMIT = 256
#: the ``kind`` values of husk's agent (``guest.agent.metrics.MEMINFO``)
MEMORY_KINDS = frozenset({"total", "free", "available", "buffers", "cached", "shmem"})
#: the ``mode`` values of husk's agent (``guest.agent.metrics.CPU_MODES``)
CPU_MODES = frozenset({"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"})
#: family → (type, label name → its allowed values) of what husk's agent reports;
#: nothing else is kept, so a guest cannot add a series the agent does not define
GUEST_FAMILIES: dict[str, tuple[str, dict[str, frozenset[str]]]] = {
    "husk_guest_memory_bytes": ("gauge", {"kind": MEMORY_KINDS}),
    "husk_guest_cpu_seconds": ("counter", {"mode": CPU_MODES}),
    "husk_guest_cpus_online": ("gauge", {}),
    "husk_guest_uptime_seconds": ("gauge", {}),
}
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class VmmFigures:
    """The VMM process as the host sees it."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int
    #: the most it was ever resident (``VmHWM``); 0 where the kernel does not say
    peak_rss_bytes: int = 0

    @property
    def returned_bytes(self) -> int:
        """Memory the VMM held at its peak and has given back to the host since: the
        pages its guest reported free (virtio-balloon free page reporting), which
        QEMU discards."""
        return max(0, self.peak_rss_bytes - self.rss_bytes)


@dataclass(frozen=True)
class GuestSample:
    """One kept sample of the guest's text."""

    family: str
    kind: str
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class ContainerFigures:
    """One container's cgroup, from the guest."""

    container_id: str
    memory_usage_bytes: int
    memory_limit_bytes: int
    cpu_seconds: float
    pids: int


@dataclass
class Snapshot:
    """Everything one scrape found; parts that could not be read are empty."""

    sandbox_id: str = ""
    hypervisor: str = ""
    vcpus: int = 0
    memory_bytes: int = 0
    boot_seconds: float = 0.0
    vmm: VmmFigures | None = None
    guest: list[GuestSample] = field(default_factory=list)
    containers: list[ContainerFigures] = field(default_factory=list)


def vmm_figures(pid: int, proc: Path = Path("/proc")) -> VmmFigures | None:
    """utime, stime (fields 14, 15 of ``stat``), resident pages (``statm``) and the
    peak resident size (``VmHWM`` of ``status``) of ``pid``."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        statm = (proc / str(pid) / "statm").read_text()
        status = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    peak = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return VmmFigures(
        user_seconds=int(fields[11]) / _TICKS,
        system_seconds=int(fields[12]) / _TICKS,
        rss_bytes=int(statm.split()[1]) * _PAGE,
        peak_rss_bytes=peak,
    )


def guest_samples(text: str) -> list[GuestSample]:
    """The samples of the agent's text husk knows, checked; anything else is dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    if len(text) > GUEST_TEXT_LIMIT:
        log.warning("the guest's metrics text is %d bytes; ignoring it", len(text))
        return []
    kept: list[GuestSample] = []
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    try:
        for family in text_string_to_metric_families(text):
            expected = GUEST_FAMILIES.get(family.name)
            if expected is None or family.type != expected[0]:
                continue
            for sample in family.samples:
                series = (sample.name, tuple(sorted(sample.labels.items())))
                if series in seen or not _acceptable(sample.labels, sample.value, expected[1]):
                    continue
                seen.add(series)
                kept.append(
                    GuestSample(
                        family.name, family.type, sample.name, dict(sample.labels), sample.value
                    )
                )
                if len(kept) >= GUEST_SAMPLE_LIMIT:
                    return kept
    except (ValueError, TypeError, IndexError) as e:
        log.debug("the guest's metrics text does not parse: %s", e)
        return []
    return kept


def _acceptable(labels: dict[str, str], value: float, allowed: dict[str, frozenset[str]]) -> bool:
    if set(labels) != set(allowed):
        return False
    if not all(v in allowed[name] for name, v in labels.items()):
        return False
    return math.isfinite(value) and value >= 0


def container_figures(
    container_id: str, stats: agent_pb2.StatsContainerResponse
) -> ContainerFigures:
    """The figures of a ``StatsContainer`` answer."""
    cgroup = stats.cgroup_stats
    return ContainerFigures(
        container_id=container_id,
        memory_usage_bytes=cgroup.memory_stats.usage.usage,
        memory_limit_bytes=cgroup.memory_stats.usage.limit,
        cpu_seconds=cgroup.cpu_stats.cpu_usage.total_usage / 1e9,
        pids=cgroup.pids_stats.current,
    )


async def take(sandbox: Sandbox | None) -> Snapshot:
    """Read everything a scrape shows of ``sandbox`` (an empty snapshot for none)."""
    snapshot = Snapshot()
    if sandbox is None:
        return snapshot
    snapshot.sandbox_id = sandbox.id
    snapshot.hypervisor = sandbox.hypervisor.name
    snapshot.vcpus = sandbox.vm_spec.vcpus
    snapshot.memory_bytes = sandbox.vm_spec.memory_mib * 1024 * 1024
    snapshot.boot_seconds = sandbox.boot_seconds
    pid = sandbox.hypervisor.vmm_pid()
    if pid is not None:
        snapshot.vmm = vmm_figures(pid)
    with trio.move_on_after(SCRAPE_TIMEOUT):
        await _from_agent(sandbox, snapshot)
    return snapshot


async def _from_agent(sandbox: Sandbox, snapshot: Snapshot) -> None:
    try:
        agent = sandbox.agent
    except HuskError:
        return  # booting or going away: no guest figures
    try:
        snapshot.guest = guest_samples(await agent.get_metrics(timeout=SCRAPE_TIMEOUT))
    except (RpcError, ConnectionClosed) as e:
        log.debug("sandbox %s: GetMetrics: %s", sandbox.id, e)
    for container in list(sandbox.containers.values()):
        if container.init.exited.is_set():
            continue
        try:
            stats = await agent.stats_container(container.id)
        except (RpcError, ConnectionClosed) as e:
            log.debug("container %s: StatsContainer: %s", container.id, e)
            continue
        snapshot.containers.append(container_figures(container.id, stats))
