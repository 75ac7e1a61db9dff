"""Running critest against a CRI endpoint and reading what it reports.

``run(tools, endpoint, handler, images_file, report)`` runs the critest binary
(``critest_tools``) against ``endpoint`` with ``--runtime-handler handler``,
``--test-images-file`` and a ginkgo JSON report; ``read_report`` turns
that report into one ``SpecResult`` per spec (its full name: the describe
texts and the ``It`` text joined by spaces, as ``critest -ginkgo.v`` prints it).
``Differences`` reads ``tests/conformance/critest-differences.txt`` (what a VM
must do differently, argued) and ``critest-known-bugs.txt`` (what husk still
lacks; the same format).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.kubelet.critest_tools import CriTools

PASSED = "passed"
DIFFERENCES = Path(__file__).parents[1] / "conformance" / "critest-differences.txt"
#: specs husk fails for lack of a feature: bugs to fix, tolerated while listed
KNOWN_BUGS = Path(__file__).parents[1] / "conformance" / "critest-known-bugs.txt"
#: at most this many specs may pass on runc and not on husk (issue 26)
MAX_DIFFERENCES = 8


@dataclass(frozen=True)
class SpecResult:
    """One spec of a critest run."""

    name: str
    state: str
    seconds: float
    failure: str

    @property
    def passed(self) -> bool:
        return self.state == PASSED


@dataclass(frozen=True)
class Run:
    """A whole critest run: its specs by name, how long it took, its exit status."""

    handler: str
    specs: Mapping[str, SpecResult]
    seconds: float
    returncode: int
    output: str

    @property
    def passed(self) -> set[str]:
        return {name for name, spec in self.specs.items() if spec.passed}

    @property
    def ran(self) -> set[str]:
        return {
            name for name, spec in self.specs.items() if spec.state not in ("skipped", "pending")
        }

    def summary(self) -> str:
        return f"{self.handler}: {len(self.passed)}/{len(self.ran)} passed in {self.seconds:.0f} s"


def read_report(path: Path) -> dict[str, SpecResult]:
    """The ``It`` specs of a ginkgo JSON report, by full name."""
    results: dict[str, SpecResult] = {}
    for suite in json.loads(path.read_text()):
        for spec in suite.get("SpecReports") or ():
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*spec.get("ContainerHierarchyTexts", []), spec["LeafNodeText"]])
            failure = (spec.get("Failure") or {}).get("Message", "")
            results[name] = SpecResult(
                name, spec["State"], spec.get("RunTime", 0) / 1e9, failure.strip()
            )
    return results


def run(
    tools: CriTools,
    endpoint: str,
    handler: str,
    images_file: Path,
    report: Path,
    timeout: float,
    extra: tuple[str, ...] = (),
) -> Run:
    """critest against ``endpoint`` with ``handler``; its report at ``report``."""
    argv = [
        str(tools.critest),
        f"--runtime-endpoint=unix://{endpoint}",
        f"--image-endpoint=unix://{endpoint}",
        f"--runtime-handler={handler}",
        f"--test-images-file={images_file}",
        f"--ginkgo.json-report={report}",
        f"--ginkgo.timeout={int(timeout)}s",
        "--ginkgo.no-color",
        *extra,
    ]
    began = time.monotonic()
    with open(report.with_suffix(".log"), "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout + 120,
                              cwd=report.parent, check=False)  # fmt: skip
    seconds = time.monotonic() - began
    output = report.with_suffix(".log").read_text(errors="replace")
    if not report.is_file():
        raise RuntimeError(f"critest ({handler}) wrote no report (exit {proc.returncode}): "
                           f"{output[-2000:]}")  # fmt: skip
    return Run(handler, read_report(report), seconds, proc.returncode, output)


@dataclass(frozen=True)
class Differences:
    """The specs that may pass on runc and not on husk, each with its reason."""

    reasons: Mapping[str, str]

    @classmethod
    def read(cls, path: Path = DIFFERENCES) -> Differences:
        """``# reason`` lines, then the specs they argue for (one spec a line)."""
        reasons: dict[str, str] = {}
        pending: list[str] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#"):
                pending.append(line.lstrip("#").strip())
            elif line:
                reasons[line] = " ".join(pending).strip()
            else:
                pending = []
        return cls(reasons)
