"""Container statistics from the cgroup filesystem, v2 (the guest) or v1 (older hosts).

The figures fill Kata's ``CgroupStats``: CPU times in nanoseconds, memory in
bytes, pids as counts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from agent_proto import agent_pb2

_USER_HZ_NS = 10_000_000  # cpuacct.stat counts USER_HZ (100/s) ticks


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return 0


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def is_unified(root: Path) -> bool:
    """Whether ``root`` is a cgroup v2 (unified) hierarchy."""
    return (root / "cgroup.controllers").exists()


def stats_v2(group: Path) -> agent_pb2.CgroupStats:
    """Read a cgroup v2 directory."""
    cpu = _read_keyed(group / "cpu.stat")
    memory = _read_keyed(group / "memory.stat")
    stats = agent_pb2.CgroupStats()
    usage = stats.cpu_stats.cpu_usage
    usage.total_usage = cpu.get("usage_usec", 0) * 1000
    usage.usage_in_usermode = cpu.get("user_usec", 0) * 1000
    usage.usage_in_kernelmode = cpu.get("system_usec", 0) * 1000
    throttling = stats.cpu_stats.throttling_data
    throttling.periods = cpu.get("nr_periods", 0)
    throttling.throttled_periods = cpu.get("nr_throttled", 0)
    throttling.throttled_time = cpu.get("throttled_usec", 0) * 1000
    mem = stats.memory_stats
    mem.usage.usage = _read_int(group / "memory.current")
    mem.usage.max_usage = _read_int(group / "memory.peak")
    mem.usage.limit = _read_int(group / "memory.max")
    events = _read_keyed(group / "memory.events")
    mem.usage.failcnt = events.get("max", 0)
    mem.events.update(events)
    mem.swap_usage.usage = _read_int(group / "memory.swap.current")
    mem.swap_usage.limit = _read_int(group / "memory.swap.max")
    mem.cache = memory.get("file", 0)
    mem.use_hierarchy = True
    mem.stats.update(memory)
    stats.pids_stats.current = _read_int(group / "pids.current")
    stats.pids_stats.limit = _read_int(group / "pids.max")
    return stats


def stats_v1(root: Path, cgroups_path: str) -> agent_pb2.CgroupStats:
    """Read the per-controller directories of a cgroup v1 hierarchy."""
    rel = cgroups_path.lstrip("/")
    cpuacct = root / "cpuacct" / rel
    memory_dir = root / "memory" / rel
    stats = agent_pb2.CgroupStats()
    usage = stats.cpu_stats.cpu_usage
    usage.total_usage = _read_int(cpuacct / "cpuacct.usage")
    with contextlib.suppress(OSError, ValueError):
        usage.percpu_usage.extend(
            int(v) for v in (cpuacct / "cpuacct.usage_percpu").read_text().split()
        )
    ticks = _read_keyed(cpuacct / "cpuacct.stat")
    usage.usage_in_usermode = ticks.get("user", 0) * _USER_HZ_NS
    usage.usage_in_kernelmode = ticks.get("system", 0) * _USER_HZ_NS
    memory = _read_keyed(memory_dir / "memory.stat")
    mem = stats.memory_stats
    mem.usage.usage = _read_int(memory_dir / "memory.usage_in_bytes")
    mem.usage.max_usage = _read_int(memory_dir / "memory.max_usage_in_bytes")
    mem.usage.failcnt = _read_int(memory_dir / "memory.failcnt")
    mem.usage.limit = _read_int(memory_dir / "memory.limit_in_bytes")
    mem.cache = memory.get("cache", 0)
    mem.use_hierarchy = _read_int(memory_dir / "memory.use_hierarchy") == 1
    mem.stats.update(memory)
    pids = root / "pids" / rel
    stats.pids_stats.current = _read_int(pids / "pids.current")
    stats.pids_stats.limit = _read_int(pids / "pids.max")
    return stats


def container_stats(root: Path, cgroups_path: str) -> agent_pb2.CgroupStats:
    """Statistics of the cgroup ``cgroups_path`` under the hierarchy mounted at ``root``."""
    if is_unified(root):
        return stats_v2(root / cgroups_path.lstrip("/"))
    return stats_v1(root, cgroups_path)


def remove_empty(root: Path, cgroups_path: str) -> None:
    """Remove an (empty) cgroup directory in every hierarchy; ignore what is busy or gone."""
    rel = cgroups_path.lstrip("/")
    candidates = [root / rel] if is_unified(root) else [d / rel for d in root.iterdir()]
    for group in candidates:
        with contextlib.suppress(OSError):
            group.rmdir()
