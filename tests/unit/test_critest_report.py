"""How the critest comparison reads ginkgo's JSON report and the list of differences."""

from __future__ import annotations

import json
from pathlib import Path

from tests.kubelet.critest import DIFFERENCES, MAX_DIFFERENCES, Differences, read_report


def _report(path: Path, *specs: dict[str, object]) -> Path:
    path.write_text(json.dumps([{"SuiteDescription": "critest", "SpecReports": list(specs)}]))
    return path


def _spec(leaf: str, state: str, kind: str = "It") -> dict[str, object]:
    return {
        "ContainerHierarchyTexts": ["[k8s.io] Streaming", "runtime should support streaming"],
        "LeafNodeText": leaf, "LeafNodeType": kind, "State": state, "RunTime": 2_500_000_000,
        "Failure": {"Message": "  boom \n"} if state == "failed" else None,
    }  # fmt: skip


def test_a_spec_is_named_by_its_describe_texts_and_its_it_text(tmp_path: Path) -> None:
    specs = read_report(
        _report(tmp_path / "r.json", _spec("runtime should support attach", "passed"))
    )
    name = "[k8s.io] Streaming runtime should support streaming runtime should support attach"
    assert list(specs) == [name]
    assert specs[name].passed and specs[name].seconds == 2.5


def test_suite_setup_nodes_are_not_specs(tmp_path: Path) -> None:
    specs = read_report(
        _report(tmp_path / "r.json", _spec("", "passed", "SynchronizedBeforeSuite"))
    )
    assert specs == {}


def test_a_failed_spec_keeps_its_message(tmp_path: Path) -> None:
    (spec,) = read_report(_report(tmp_path / "r.json", _spec("x", "failed"))).values()
    assert not spec.passed and spec.failure == "boom"


def test_each_difference_takes_the_comment_lines_above_it_as_its_reason(tmp_path: Path) -> None:
    listed = tmp_path / "d.txt"
    listed.write_text("# header\n\n# a VM has its own kernel:\n# no host IPC\n[k8s.io] a spec\n")
    assert Differences.read(listed).reasons == {
        "[k8s.io] a spec": "a VM has its own kernel: no host IPC"
    }


def test_the_projects_list_of_differences_is_short_and_every_entry_argued() -> None:
    reasons = Differences.read(DIFFERENCES).reasons
    assert len(reasons) <= MAX_DIFFERENCES
    assert all(len(reason) >= 40 for reason in reasons.values()), reasons
