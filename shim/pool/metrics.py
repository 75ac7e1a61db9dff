"""The pool daemon's figures as Prometheus text (``husk_vm_pool_*``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: the Content-Type of the text format (version 0.0.4)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PoolCollector(Collector):
    """Yields the families of one ``PoolDaemon.status()``."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status
        yield GaugeMetricFamily(
            "husk_vm_pool_size", "VMs the pool keeps ([factory] vm_cache_number).", value=s["size"]
        )
        yield GaugeMetricFamily("husk_vm_pool_ready", "VMs ready to be claimed.", value=s["ready"])
        yield GaugeMetricFamily(
            "husk_vm_pool_booting", "VMs booting or being exercised.", value=s["booting"]
        )
        yield GaugeMetricFamily(
            "husk_vm_pool_idle_memory_bytes",
            "Proportional set size of the ready VMs' QEMU and member processes.",
            value=s["idle_memory_bytes"],
        )
        yield CounterMetricFamily(
            "husk_vm_pool_hits", "Claims answered with a ready VM.", value=s["hits"]
        )
        yield CounterMetricFamily(
            "husk_vm_pool_misses", "Claims the pool could not serve.", value=s["misses"]
        )
        yield CounterMetricFamily(
            "husk_vm_pool_failures",
            "Pool VMs that failed before they were ready.",
            value=s["failures"],
        )
        yield GaugeMetricFamily(
            "husk_vm_pool_refill_seconds",
            "Seconds from starting a pool VM to its being ready (the latest).",
            value=s["refill_seconds_last"],
        )
        yield GaugeMetricFamily(
            "husk_vm_pool_refill_seconds_mean",
            "Mean seconds from starting a pool VM to its being ready (recent ones).",
            value=s["refill_seconds_mean"],
        )


def render(status: Mapping[str, Any]) -> bytes:
    """The text a scrape gets."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(status))
    return generate_latest(registry)
