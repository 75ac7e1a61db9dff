"""Per-sandbox metrics: recorded histograms, the guest's text kept with care, the
Prometheus exposition, the unix-socket HTTP server and `husk metrics`' merge."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from guest.agent.metrics import CPU_MODES, MEMINFO, guest_metrics
from shim.metrics import exposition, scrape, server
from shim.metrics.recorder import Histogram
from shim.metrics.snapshot import (
    GUEST_FAMILIES,
    ContainerFigures,
    Snapshot,
    VmmFigures,
    guest_samples,
    vmm_figures,
)


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text, keyed by name and sorted labels (the text must parse)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_buckets_are_cumulative_with_inf_last() -> None:
    h = Histogram("t_seconds", "doc", ("method",), (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(("Check",), value)
    [(labels, buckets, total)] = list(h.cumulative())
    assert labels == ("Check",)
    assert buckets == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert total == 3.65


def test_the_agents_guest_text_is_kept_whole() -> None:
    text = guest_metrics()
    kept = guest_samples(text)
    assert len(kept) == len(samples(text)) > 10
    assert {s.family for s in kept} == {
        "husk_guest_memory_bytes", "husk_guest_cpu_seconds",
        "husk_guest_cpus_online", "husk_guest_uptime_seconds",
    }  # fmt: skip


def test_hostile_guest_text_keeps_only_known_checked_samples() -> None:
    text = (
        "# TYPE husk_guest_memory_bytes gauge\n"
        'husk_guest_memory_bytes{kind="total"} 1024\n'
        'husk_guest_memory_bytes{kind="total",extra="x"} 1\n'
        'husk_guest_memory_bytes{kind="\\u001b[31m"} 1\n'
        'husk_guest_memory_bytes{kind="free"} NaN\n'
        'husk_guest_memory_bytes{kind="used"} -5\n'
        "# TYPE husk_shim_process_cpu_seconds_total counter\n"
        "husk_shim_process_cpu_seconds_total 99\n"
    )
    assert [(s.labels, s.value) for s in guest_samples(text)] == [({"kind": "total"}, 1024.0)]
    assert guest_samples("not { prometheus") == []
    assert guest_samples("# TYPE x gauge\n" + "x 1\n" * 100_000) == []


def test_a_hostile_scrape_with_invented_label_values_adds_no_series() -> None:
    honest = (
        "# TYPE husk_guest_memory_bytes gauge\n"
        'husk_guest_memory_bytes{kind="total"} 1024\n'
        "# TYPE husk_guest_cpu_seconds_total counter\n"
        'husk_guest_cpu_seconds_total{mode="user"} 1.5\n'
    )
    hostile = (
        "# TYPE husk_guest_memory_bytes gauge\n"
        'husk_guest_memory_bytes{kind="total"} 1024\n'
        + "".join(f'husk_guest_memory_bytes{{kind="k{i}"}} 1\n' for i in range(200))
        + "# TYPE husk_guest_cpu_seconds_total counter\n"
        'husk_guest_cpu_seconds_total{mode="user"} 1.5\n'
        + "".join(f'husk_guest_cpu_seconds_total{{mode="m{i}"}} 1\n' for i in range(200))
    )
    series = {(s.name, tuple(s.labels.items())) for s in guest_samples(hostile)}
    assert series == {(s.name, tuple(s.labels.items())) for s in guest_samples(honest)}
    assert len(series) == 2


def test_a_series_the_guest_repeats_is_kept_once() -> None:
    text = (
        "# TYPE husk_guest_memory_bytes gauge\n"
        'husk_guest_memory_bytes{kind="total"} 1024\n'
        'husk_guest_memory_bytes{kind="total"} 2048\n'
        "# TYPE husk_guest_uptime_seconds gauge\n"
        "husk_guest_uptime_seconds 5\n"
        "husk_guest_uptime_seconds 6\n"
    )
    kept = [(s.name, s.labels, s.value) for s in guest_samples(text)]
    assert kept == [
        ("husk_guest_memory_bytes", {"kind": "total"}, 1024.0),
        ("husk_guest_uptime_seconds", {}, 5.0),
    ]


def test_the_shim_keeps_exactly_the_kinds_and_modes_the_agent_defines() -> None:
    allowed = {name: values for name, (_, values) in GUEST_FAMILIES.items()}
    assert allowed["husk_guest_memory_bytes"] == {"kind": frozenset(MEMINFO.values())}
    assert allowed["husk_guest_cpu_seconds"] == {"mode": frozenset(CPU_MODES)}


def test_vmm_figures_read_proc() -> None:
    figures = vmm_figures(os.getpid())
    assert figures is not None and figures.rss_bytes > 1024 * 1024
    assert figures.user_seconds + figures.system_seconds > 0
    assert figures.peak_rss_bytes >= figures.rss_bytes
    assert vmm_figures(2**22 + 1) is None


def test_returned_memory_is_what_the_vmm_gave_back_since_its_peak() -> None:
    snapshot = Snapshot(sandbox_id="sb", vmm=VmmFigures(1.0, 0.5, 100 << 20, 300 << 20))
    found = samples(exposition.render(snapshot))
    assert found[("husk_vmm_returned_memory_bytes", ())] == 200 << 20
    assert found[("husk_vmm_resident_memory_bytes", ())] == 100 << 20


def test_exposition_of_a_snapshot_parses_with_every_part() -> None:
    snapshot = Snapshot(
        sandbox_id="sb", hypervisor="qemu", vcpus=2, memory_bytes=512 << 20, boot_seconds=4.5,
        vmm=vmm_figures(os.getpid()),
        guest=guest_samples(guest_metrics()),
        containers=[ContainerFigures("c1", 33 << 20, 0, 1.25, 3)],
    )  # fmt: skip
    recorded = Histogram("husk_agent_rpc_duration_seconds", "doc", ("method",), (0.01, 0.1))
    recorded.observe(("CreateContainer",), 0.05)
    collector = exposition.SnapshotCollector(snapshot, [recorded])
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    found = samples(generate_latest(registry))
    assert found[("husk_container_memory_usage_bytes", (("container_id", "c1"),))] == 33 << 20
    assert found[("husk_container_cpu_seconds_total", (("container_id", "c1"),))] == 1.25
    assert found[("husk_sandbox_boot_seconds", ())] == 4.5
    assert found[("husk_vmm_resident_memory_bytes", ())] > 0
    assert ("husk_vmm_cpu_seconds_total", (("mode", "user"),)) in found
    assert found[("husk_guest_memory_bytes", (("kind", "total"),))] > 0
    assert found[("husk_agent_rpc_duration_seconds_count", (("method", "CreateContainer"),))] == 1
    assert ("husk_shim_process_resident_memory_bytes", ()) in samples(exposition.render(snapshot))


async def _served(tmp_path: Path, request: bytes) -> bytes:
    path = tmp_path / "metrics.sock"

    async def render() -> tuple[bytes, str]:
        return exposition.render(Snapshot()), exposition.CONTENT_TYPE

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, path, render)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(request)
            chunks = []
            while chunk := await stream.receive_some():
                chunks.append(chunk)
        nursery.cancel_scope.cancel()
    assert not path.exists()
    return b"".join(chunks)


async def test_server_answers_get_metrics_with_the_text_format(tmp_path: Path) -> None:
    reply = await _served(tmp_path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert ("husk_shim_process_open_fds", ()) in samples(body)


async def test_server_refuses_other_paths_methods_and_garbage(tmp_path: Path) -> None:
    assert (await _served(tmp_path, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
    post = await _served(tmp_path, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405")
    assert (await _served(tmp_path, b"\x00\x01\r\n\r\n")).startswith(b"HTTP/1.1 400")


def test_merge_labels_each_sandbox_and_stays_one_valid_text() -> None:
    one = exposition.render(Snapshot(sandbox_id="a", hypervisor="qemu", vcpus=1)).decode()
    two = exposition.render(Snapshot(sandbox_id="b", hypervisor="qemu", vcpus=2)).decode()
    merged = samples(scrape.merge([("a", one), ("b", two)]))
    assert merged[("husk_sandbox_vcpus", (("sandbox_id", "a"),))] == 1
    assert merged[("husk_sandbox_vcpus", (("sandbox_id", "b"),))] == 2
