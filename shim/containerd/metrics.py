"""A container's statistics as containerd wants them: cgroups v2 ``Metrics`` in an ``Any``.

The guest runs cgroup2, so ``Task.Stats`` answers what runc's shim answers on
a cgroup2 host: ``io.containerd.cgroups.v2.Metrics``, packed with that bare
type URL (containerd's typeurl registry names gogo types by their proto name),
which ``ctr task metrics`` and the CRI's stats decode.

The figures come from the agent's ``StatsContainer`` (Kata's ``CgroupStats``,
which the agent fills from the cgroup's files): CPU times back to the
microseconds of ``cpu.stat``, memory from ``memory.current``/``memory.max``
and every ``memory.stat`` key by its own name. A memory, swap or pids limit
the agent reports as 0 is ``max`` (the agent reads "max" as 0), which cgroups
v2 metrics give as 2^64 - 1. ``memory.events`` (``low`` .. ``oom_kill``)
become ``memory_events``, which the CRI reports as
``container_oom_events_total``. The agent sends no I/O, RDMA or hugetlb
figures for cgroup2, so those stay unset. ``pids``, ``cpu`` and ``memory``
are always present: ctr 1.6 prints their fields without checking for nil.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from agent_proto import agent_pb2, cgroups_v2_pb2

TYPE_URL = "io.containerd.cgroups.v2.Metrics"
#: how cgroups v2 metrics write "max" (no limit)
UNLIMITED = 2**64 - 1
_NS_PER_USEC = 1000


def from_agent(response: agent_pb2.StatsContainerResponse) -> cgroups_v2_pb2.Metrics:
    """containerd's cgroups v2 metrics from the agent's figures."""
    stats = response.cgroup_stats
    metrics = cgroups_v2_pb2.Metrics()
    metrics.pids.current = stats.pids_stats.current
    metrics.pids.limit = stats.pids_stats.limit or UNLIMITED
    usage, throttling = stats.cpu_stats.cpu_usage, stats.cpu_stats.throttling_data
    metrics.cpu.usage_usec = usage.total_usage // _NS_PER_USEC
    metrics.cpu.user_usec = usage.usage_in_usermode // _NS_PER_USEC
    metrics.cpu.system_usec = usage.usage_in_kernelmode // _NS_PER_USEC
    metrics.cpu.nr_periods = throttling.periods
    metrics.cpu.nr_throttled = throttling.throttled_periods
    metrics.cpu.throttled_usec = throttling.throttled_time // _NS_PER_USEC
    memory, figures = stats.memory_stats, metrics.memory
    for field in cgroups_v2_pb2.MemoryStat.DESCRIPTOR.fields:
        if field.name in memory.stats:
            setattr(figures, field.name, memory.stats[field.name])
    figures.usage = memory.usage.usage
    figures.usage_limit = memory.usage.limit or UNLIMITED
    figures.swap_usage = memory.swap_usage.usage
    figures.swap_limit = memory.swap_usage.limit or UNLIMITED
    for part in (metrics.pids, metrics.cpu, metrics.memory):
        part.SetInParent()
    if memory.events:
        # the CRI's container_oom_events_total is memory_events.oom_kill
        for field in cgroups_v2_pb2.MemoryEvents.DESCRIPTOR.fields:
            setattr(metrics.memory_events, field.name, memory.events.get(field.name, 0))
    return metrics


def pack(metrics: cgroups_v2_pb2.Metrics) -> any_pb2.Any:
    """The ``Any`` of ``StatsResponse.stats``."""
    return any_pb2.Any(type_url=TYPE_URL, value=metrics.SerializeToString())


def total(parts: list[cgroups_v2_pb2.Metrics]) -> cgroups_v2_pb2.Metrics:
    """A pod's figures: the sums of its containers' counters and usages (limits are theirs)."""
    metrics = cgroups_v2_pb2.Metrics()
    for part in parts:
        metrics.pids.current += part.pids.current
        metrics.cpu.usage_usec += part.cpu.usage_usec
        metrics.cpu.user_usec += part.cpu.user_usec
        metrics.cpu.system_usec += part.cpu.system_usec
        metrics.cpu.nr_periods += part.cpu.nr_periods
        metrics.cpu.nr_throttled += part.cpu.nr_throttled
        metrics.cpu.throttled_usec += part.cpu.throttled_usec
        metrics.memory.usage += part.memory.usage
        metrics.memory.swap_usage += part.memory.swap_usage
    for section in (metrics.pids, metrics.cpu, metrics.memory):
        section.SetInParent()
    return metrics
