"""``GetMetrics``: the guest's own memory and CPU figures, as Prometheus text.

Kata's agent answers ``GetMetrics`` with the guest's figures in the text
format; husk's does the same for the few the shim exports (it keeps only these
families, see ``shim.metrics.snapshot``)::

    husk_guest_memory_bytes{kind="total|free|available|buffers|cached|shmem"}
    husk_guest_cpu_seconds_total{mode="user|nice|system|idle|iowait|irq|softirq|steal"}
    husk_guest_cpus_online
    husk_guest_uptime_seconds
"""

from __future__ import annotations

import os
from pathlib import Path

#: /proc/meminfo keys → the ``kind`` label
MEMINFO = {
    "MemTotal": "total",
    "MemFree": "free",
    "MemAvailable": "available",
    "Buffers": "buffers",
    "Cached": "cached",
    "Shmem": "shmem",
}
#: the columns of /proc/stat's ``cpu`` line, in order
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _meminfo(proc: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        lines = (proc / "meminfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        key, _, rest = line.partition(":")
        words = rest.split()
        if key in MEMINFO and words and words[0].isdigit():
            found[MEMINFO[key]] = int(words[0]) * 1024  # kB
    return found


def _cpu_seconds(proc: Path) -> dict[str, float]:
    try:
        first = (proc / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return {}
    if first[:1] != ["cpu"]:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    return {mode: int(v) / ticks for mode, v in zip(CPU_MODES, first[1:], strict=False)}


def _cpus_online(sys: Path) -> int:
    try:
        text = (sys / "devices" / "system" / "cpu" / "online").read_text().strip()
    except OSError:
        return 0
    total = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        total += int(high) - int(low) + 1 if high else 1
    return total


def _uptime(proc: Path) -> float:
    try:
        return float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _family(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> list[str]:
    # the text format names a counter's samples, HELP and TYPE with ``_total``
    full = name + ("_total" if kind == "counter" else "")
    lines = [f"# HELP {full} {doc}", f"# TYPE {full} {kind}"]
    lines += [f"{full}{labels} {value!r}" for labels, value in samples]
    return lines


def guest_metrics(proc: Path = Path("/proc"), sys: Path = Path("/sys")) -> str:
    """The guest's figures in the Prometheus text format."""
    memory = _meminfo(proc)
    cpu = _cpu_seconds(proc)
    lines = _family(
        "husk_guest_memory_bytes", "gauge", "Guest memory from /proc/meminfo, by kind.",
        [(f'{{kind="{k}"}}', float(v)) for k, v in memory.items()],
    )  # fmt: skip
    lines += _family(
        "husk_guest_cpu_seconds", "counter", "Guest CPU time of all CPUs, by mode.",
        [(f'{{mode="{m}"}}', v) for m, v in cpu.items()],
    )  # fmt: skip
    lines += _family(
        "husk_guest_cpus_online", "gauge", "CPUs online in the guest.",
        [("", float(_cpus_online(sys)))],
    )  # fmt: skip
    lines += _family(
        "husk_guest_uptime_seconds", "gauge", "Seconds since the guest kernel booted.",
        [("", _uptime(proc))],
    )  # fmt: skip
    return "\n".join(lines) + "\n"
