"""What one scrape reads from a sandbox: the VMM's process, the guest, each container.

Everything is read at scrape time, within :data:`SCRAPE_TIMEOUT`: the VMM's
CPU seconds and RSS from ``/proc/<pid>`` of the process the hypervisor plugin
names (``Hypervisor.vmm_pid``), the guest's memory and CPU from the agent's
``GetMetrics`` and each running container's cgroup from ``StatsContainer``.
A part that cannot be read (an older agent without ``GetMetrics``, a container
going away) is left out; the scrape still answers.

The guest is hostile: its ``GetMetrics`` text is parsed with a size bound and
only the families, label names and values husk's agent sends are kept.
"""

from __future__ import annotations

import logging
import math
import os
import re
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
#: family → (type, label names) of what husk's agent reports; nothing else is kept
GUEST_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "husk_guest_memory_bytes": ("gauge", ("kind",)),
    "husk_guest_cpu_seconds": ("counter", ("mode",)),
    "husk_guest_cpus_online": ("gauge", ()),
    "husk_guest_uptime_seconds": ("gauge", ()),
}
_LABEL_VALUE = re.compile(r"^[a-z0-9_]{1,32}$")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class VmmFigures:
    """The VMM process as the host sees it."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int


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
    """utime, stime (fields 14, 15 of ``stat``) and resident pages (``statm``) of ``pid``."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        statm = (proc / str(pid) / "statm").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return VmmFigures(
        user_seconds=int(fields[11]) / _TICKS,
        system_seconds=int(fields[12]) / _TICKS,
        rss_bytes=int(statm.split()[1]) * _PAGE,
    )


def guest_samples(text: str) -> list[GuestSample]:
    """The samples of the agent's text husk knows, checked; anything else is dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    if len(text) > GUEST_TEXT_LIMIT:
        log.warning("the guest's metrics text is %d bytes; ignoring it", len(text))
        return []
    kept: list[GuestSample] = []
    try:
        for family in text_string_to_metric_families(text):
            expected = GUEST_FAMILIES.get(family.name)
            if expected is None or family.type != expected[0]:
                continue
            for sample in family.samples:
                if _acceptable(sample.labels, sample.value, expected[1]):
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


def _acceptable(labels: dict[str, str], value: float, names: tuple[str, ...]) -> bool:
    if set(labels) != set(names) or not all(_LABEL_VALUE.match(v) for v in labels.values()):
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
