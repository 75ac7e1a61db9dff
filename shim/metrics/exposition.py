"""A :class:`~shim.metrics.snapshot.Snapshot` and the recorded histograms as Prometheus text.

``prometheus_client`` holds the registry and formats the text; husk adds one
collector that turns the snapshot into metric families (names below), plus the
shim's own process figures (``husk_shim_process_*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shim.metrics.recorder import HISTOGRAMS, Histogram
from shim.metrics.snapshot import Snapshot

#: the Content-Type of the text format (version 0.0.4)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector(Collector):
    """Yields the families of one snapshot and of the recorded histograms."""

    def __init__(self, snapshot: Snapshot, histograms: Iterable[Histogram] = HISTOGRAMS) -> None:
        self.snapshot = snapshot
        self.histograms = list(histograms)

    def collect(self) -> Iterator[Metric]:
        yield from self._sandbox()
        yield from self._vmm()
        yield from self._guest()
        yield from self._containers()
        for histogram in self.histograms:
            family = HistogramMetricFamily(
                histogram.name,
                histogram.documentation,
                labels=list(histogram.label_names),
            )
            for labels, buckets, total in histogram.cumulative():
                family.add_metric(list(labels), buckets, total)
            yield family

    def _sandbox(self) -> Iterator[Metric]:
        s = self.snapshot
        if not s.sandbox_id:
            return
        info = GaugeMetricFamily(
            "husk_sandbox_info", "The sandbox this shim serves.", labels=["hypervisor"]
        )
        info.add_metric([s.hypervisor], 1)
        yield info
        yield GaugeMetricFamily("husk_sandbox_vcpus", "vCPUs the VM was given.", value=s.vcpus)
        yield GaugeMetricFamily(
            "husk_sandbox_memory_bytes", "Memory the VM was given.", value=s.memory_bytes
        )
        yield GaugeMetricFamily(
            "husk_sandbox_boot_seconds",
            "From the sandbox's start to the agent's first answer (0 while booting).",
            value=s.boot_seconds,
        )

    def _vmm(self) -> Iterator[Metric]:
        vmm = self.snapshot.vmm
        if vmm is None:
            return
        cpu = CounterMetricFamily(
            "husk_vmm_cpu_seconds", "CPU time of the VMM process.", labels=["mode"]
        )
        cpu.add_metric(["user"], vmm.user_seconds)
        cpu.add_metric(["system"], vmm.system_seconds)
        yield cpu
        yield GaugeMetricFamily(
            "husk_vmm_resident_memory_bytes", "Resident memory of the VMM process.", vmm.rss_bytes
        )
        yield GaugeMetricFamily(
            "husk_vmm_returned_memory_bytes",
            "Memory the VMM process held at its peak and has given back to the host "
            "(pages the guest reported free through virtio-balloon).",
            vmm.returned_bytes,
        )

    def _guest(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for sample in self.snapshot.guest:
            family = families.get(sample.family)
            if family is None:
                family = families[sample.family] = Metric(
                    sample.family, "As the guest agent reports it.", sample.kind
                )
            family.add_sample(sample.name, sample.labels, sample.value)
        yield from families.values()

    def _containers(self) -> Iterator[Metric]:
        figures = self.snapshot.containers
        if not figures:
            return
        label = ["container_id"]
        usage = GaugeMetricFamily(
            "husk_container_memory_usage_bytes", "Memory charged to the container's cgroup.",
            labels=label,
        )  # fmt: skip
        limit = GaugeMetricFamily(
            "husk_container_memory_limit_bytes", "The cgroup's memory limit (0: none).",
            labels=label,
        )  # fmt: skip
        cpu = CounterMetricFamily(
            "husk_container_cpu_seconds", "CPU time of the container's cgroup.", labels=label
        )
        pids = GaugeMetricFamily(
            "husk_container_pids", "Processes in the container's cgroup.", labels=label
        )
        for c in figures:
            usage.add_metric([c.container_id], c.memory_usage_bytes)
            limit.add_metric([c.container_id], c.memory_limit_bytes)
            cpu.add_metric([c.container_id], c.cpu_seconds)
            pids.add_metric([c.container_id], c.pids)
        yield from (usage, limit, cpu, pids)


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    ProcessCollector(namespace="husk_shim", registry=registry)
    return generate_latest(registry)
