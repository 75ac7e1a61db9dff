"""The ttrpc benchmark runs end to end (short), so it cannot rot between runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.conformance

REPO = Path(__file__).resolve().parents[2]


def test_bench_ttrpc_roundtrip_runs() -> None:
    argv = ["--seconds", "0.3", "--callers", "1,4", "--rounds", "1", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ttrpc_roundtrip", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    pairs = {(r["client"], r["server"], r["callers"]) for r in report["rows"]}
    assert pairs == {(c, s, n) for c in ("go", "husk") for s in ("go", "husk") for n in (1, 4)}
    assert all(r["calls"] > 0 and r["rate"] > 0 for r in report["rows"]), report
    assert set(report["ratio_husk_over_go"]) == {"1", "4"}
    assert all(v > 0 for v in report["ratio_husk_over_go"].values())


def test_bench_memory_measures_an_idle_runc_pod() -> None:
    argv = ["--handlers", "runc", "--rounds", "1", "--clones", "0", "--settle", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    median = next(line for line in lines if line.startswith("runc median PSS:"))
    assert int(median.split()[-2]) > 0, proc.stdout
    assert lines[-1] == "idle pod PSS: cold -, clone -"
