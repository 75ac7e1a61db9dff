"""The bundle's spec as the shim hands it to the guest: what runc would leave implicit."""

from __future__ import annotations

from pathlib import Path

from shim.sandbox.oci import inherited_oom_score_adj, process_from_json, spec_from_json
from tests.unit.oci_samples import ctr_run_spec


def test_a_spec_without_oom_score_adj_gets_the_one_runcs_shim_would_hand_down() -> None:
    # containerd-shim-runc-v2 runs at containerd's score + 1 and its containers inherit it
    expected = min(int(Path("/proc/self/oom_score_adj").read_text()) + 1, 1000)
    assert spec_from_json(ctr_run_spec()).Process.OOMScoreAdj == expected
    assert process_from_json({"args": ["sh"]}).OOMScoreAdj == expected


def test_a_spec_with_oom_score_adj_keeps_it_zero_included() -> None:
    spec = ctr_run_spec()
    spec["process"]["oomScoreAdj"] = 0
    assert spec_from_json(spec).Process.OOMScoreAdj == 0
    assert process_from_json({"args": ["sh"], "oomScoreAdj": 500}).OOMScoreAdj == 500


def test_the_inherited_score_stays_within_the_kernels_range(tmp_path: Path) -> None:
    own = tmp_path / "oom_score_adj"
    own.write_text("1000\n")
    assert inherited_oom_score_adj(own) == 1000
    own.write_text("-1000\n")
    assert inherited_oom_score_adj(own) == -999
    assert inherited_oom_score_adj(tmp_path / "missing") == 0
