"""Histograms recorded in the shim process, turned into Prometheus text only when scraped.

``prometheus_client`` takes ~80 ms to import; the calls that feed these run on
every container start, so they only count here and the exposition reads them.
One shim serves one sandbox, so a process-wide histogram is a sandbox's.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

#: seconds: an agent round trip is ~1 ms under KVM and up to seconds under TCG
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: seconds: PCIe hot-plug waits for the guest's ACPI handling
HOTPLUG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Series:
    """One label set's observations: per-bucket counts (not cumulative), sum and count."""

    counts: list[int]
    sum: float = 0.0
    count: int = 0


@dataclass
class Histogram:
    """A histogram with fixed label names; ``observe`` is O(log buckets)."""

    name: str
    documentation: str
    label_names: tuple[str, ...]
    buckets: Sequence[float]
    _series: dict[tuple[str, ...], Series] = field(default_factory=dict)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Count one observation of ``value`` under ``labels``."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = Series([0] * (len(self.buckets) + 1))
        series.counts[bisect.bisect_left(self.buckets, value)] += 1
        series.sum += value
        series.count += 1

    def cumulative(self) -> Iterator[tuple[tuple[str, ...], list[tuple[str, float]], float]]:
        """Each label set with its cumulative ``(le, count)`` buckets (``+Inf`` last) and sum."""
        for labels, series in sorted(self._series.items()):
            running = 0
            buckets = []
            for bound, count in zip([*self.buckets, float("inf")], series.counts, strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            yield labels, [(le, float(n)) for le, n in buckets], series.sum

    def clear(self) -> None:
        """Forget every observation (tests)."""
        self._series.clear()


AGENT_RPC = Histogram(
    "husk_agent_rpc_duration_seconds",
    "Round trip of agent requests that have a deadline (not the blocking waits and reads).",
    ("method",),
    RPC_BUCKETS,
)
HOTPLUG = Histogram(
    "husk_hotplug_duration_seconds",
    "How long a device hot-add or hot-remove took, guest included.",
    ("device", "action"),
    HOTPLUG_BUCKETS,
)
HISTOGRAMS = (AGENT_RPC, HOTPLUG)
