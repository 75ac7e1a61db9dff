"""critest, the CRI validation suite, on husk and on runc: husk passes wherever runc does.

One CRI containerd 2.4 (``CriContainerd`` on the matrix's 2.4) with two
handlers: ``runc`` (containerd's own, the baseline) and ``husk`` (the shim,
its pods clones of the session's VM template, as a host with templates on
runs them). Its images come from a real registry on loopback (Debian's
``docker-registry``, ``tests.kubelet.registry``) holding the images critest
names, built here (``tests.kubelet.critest_images``), which containerd pulls
through its registry host configuration as an air-gapped cluster does.
critest (``sigs.k8s.io/cri-tools`` v1.37.0, built into the suite's cache by
``tests.kubelet.critest_tools``) runs once per handler, each writing a ginkgo
JSON report; the tests compare the two pass sets. The specs allowed to pass on
runc and not on husk are listed, each with its argument, in
``tests/conformance/critest-differences.txt``.

``crictl`` from the same build drives the README's Kubernetes walk-through
(run a pod, exec into it, read its logs and stats) against the husk handler.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.containerd_versions import ContainerdBinaries, ProvisionError
from tests.kubelet import critest, critest_images, critest_tools
from tests.kubelet.cri_containerd import CriContainerd, husk_handler
from tests.kubelet.critest import KNOWN_BUGS, Differences, Run
from tests.kubelet.critest_tools import CriTools
from tests.kubelet.pods import skip_reason
from tests.kubelet.registry import LoopbackRegistry

HANDLER = "husk"
BASELINE = "runc"
#: a directory to keep critest's JSON reports in (they go with the temp dir otherwise)
REPORTS_ENV = "HUSK_CRITEST_REPORTS"
#: a ginkgo run that takes longer than this has hung
CRITEST_TIMEOUT = 3000.0


def _skip_reason() -> str | None:
    if not os.path.exists("/var/lib/husk/images/initrd.img"):
        return "no guest image: run `husk image build`"
    return skip_reason()


pytestmark = [pytest.mark.integration, pytest.mark.containerd_lines("2.4")]
_REASON = _skip_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="module")
def tools() -> CriTools:
    try:
        return critest_tools.provide()
    except ProvisionError as e:
        pytest.skip(f"critest cannot be provided: {e}")


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="critest-", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(tools: CriTools, work: Path) -> Iterator[LoopbackRegistry]:
    daemon = LoopbackRegistry(tools.registry, work / "registry")
    try:
        critest_images.push_all(daemon, tools)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def cri_ctd(
    registry: LoopbackRegistry, shared_template: str, containerd_binaries: ContainerdBinaries
) -> Iterator[CriContainerd]:
    # short: CRI ids are 64 characters and a VM's sockets live under <root>/<id>/
    base = Path(tempfile.mkdtemp(prefix="hk", dir="/tmp"))
    config = base / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{base / "s"}"\n{shared_template}')
    daemon = CriContainerd(
        Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")),
        runtimes={HANDLER: husk_handler(config)},
        env={"HUSK_CONFIG": ""},
        binaries=containerd_binaries,
        mirrors={upstream: f"http://{registry.host}" for upstream in critest_images.UPSTREAMS},
    )
    yield daemon
    daemon.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(
    tools: CriTools, cri_ctd: CriContainerd, work: Path, request: pytest.FixtureRequest
) -> dict[str, Run]:
    images = critest_images.write_images_file(work / "images.yaml")
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    kept = os.environ.get(REPORTS_ENV)
    done = {}
    for handler in (BASELINE, HANDLER):
        report = work / f"{handler}.json"
        done[handler] = critest.run(
            tools, cri_ctd.address, handler, images, report, CRITEST_TIMEOUT
        )
        if terminal is not None and capture is not None:  # counts and times, in the output
            with capture.global_and_fixture_disabled():
                terminal.write_line(f"critest {done[handler].summary()}")
        if kept:
            Path(kept).mkdir(parents=True, exist_ok=True)
            shutil.copy(report, Path(kept) / report.name)
        cri_ctd.remove_all_pods()
    return done


@pytest.fixture(scope="module")
def differences() -> Differences:
    return Differences.read()


@pytest.fixture(scope="module")
def known_bugs() -> Differences:
    return Differences.read(KNOWN_BUGS)


def _failures(run: Run, names: set[str]) -> str:
    return "\n".join(
        f"- {name} [{run.specs[name].state}]: {run.specs[name].failure[:300]}"
        for name in sorted(names)
    )


# ---- the comparison ----


def test_critest_on_runc_passes_what_this_host_and_its_images_can_serve(
    runs: dict[str, Run],
) -> None:
    # the baseline is worth comparing against: the images and the registry
    # serve what critest asks; only specs no runtime here can pass fail
    baseline = runs[BASELINE]
    assert len(baseline.ran) >= 100, baseline.summary()
    assert len(baseline.ran - baseline.passed) <= 5, _failures(
        baseline, baseline.ran - baseline.passed
    )


def test_every_spec_that_passes_on_runc_passes_on_husk_unless_listed(
    runs: dict[str, Run], differences: Differences, known_bugs: Differences
) -> None:
    husk, baseline = runs[HANDLER], runs[BASELINE]
    listed = set(differences.reasons) | set(known_bugs.reasons)
    missing = baseline.passed - husk.passed - listed
    assert not missing, f"{husk.summary()}; {baseline.summary()}\n" + _failures(husk, missing)


@pytest.mark.parametrize("listing", ["differences", "known_bugs"])
def test_every_listed_spec_exists_and_still_fails_on_husk(
    runs: dict[str, Run], listing: str, request: pytest.FixtureRequest
) -> None:
    listed = set(request.getfixturevalue(listing).reasons)
    husk = runs[HANDLER]
    unknown = listed - set(husk.specs)
    assert not unknown, f"critest has no such spec: {sorted(unknown)}"
    passing = listed & husk.passed
    assert not passing, f"passes on husk now; remove from the list: {sorted(passing)}"


# ---- crictl against the husk handler: the README's walk-through ----


def _crictl(tools: CriTools, cri_ctd: CriContainerd, *args: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [str(tools.crictl), "--runtime-endpoint", f"unix://{cri_ctd.address}",
         "--image-endpoint", f"unix://{cri_ctd.address}", "--timeout", "120s", *args],
        capture_output=True, text=True, timeout=300, check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def crictl_pod(
    tools: CriTools, cri_ctd: CriContainerd, work: Path, runs: dict[str, Run]
) -> Iterator[tuple[str, str]]:
    """A pod on the husk handler and a container printing a line, by crictl."""
    pod_json = work / "pod.json"
    pod_json.write_text(json.dumps({
        "metadata": {"name": "crictl-demo", "namespace": "default", "uid": "crictl-demo-uid"},
        "log_directory": str(work / "pod-logs"), "linux": {},
    }))  # fmt: skip
    container_json = work / "container.json"
    container_json.write_text(json.dumps({
        "metadata": {"name": "app"},
        "image": {"image": f"{critest_images.UPSTREAMS[0]}/{critest_images.E2E}/busybox:1.29-2"},
        "command": ["sh", "-c", "echo hello from husk; exec sleep 3600"],
        "log_path": "app.log", "linux": {},
    }))  # fmt: skip
    _crictl(tools, cri_ctd, "pull", json.loads(container_json.read_text())["image"]["image"])
    pod = _crictl(tools, cri_ctd, "runp", "--runtime", HANDLER, str(pod_json)).stdout.strip()
    container = _crictl(tools, cri_ctd, "create", pod, str(container_json), str(pod_json))
    container_id = container.stdout.strip()
    _crictl(tools, cri_ctd, "start", container_id)
    yield pod, container_id
    _crictl(tools, cri_ctd, "stopp", pod, check=False)
    _crictl(tools, cri_ctd, "rmp", "--force", pod, check=False)


def test_crictl_runs_a_pod_on_the_husk_runtime_class(
    tools: CriTools, cri_ctd: CriContainerd, crictl_pod: tuple[str, str]
) -> None:
    pod, _ = crictl_pod
    status = json.loads(_crictl(tools, cri_ctd, "inspectp", "-o", "json", pod).stdout)
    assert status["status"]["state"] == "SANDBOX_READY"
    assert status["status"]["runtimeHandler"] == HANDLER


def test_crictl_exec_runs_in_the_pods_vm(
    tools: CriTools, cri_ctd: CriContainerd, crictl_pod: tuple[str, str]
) -> None:
    _, container = crictl_pod
    kernel = _crictl(tools, cri_ctd, "exec", container, "uname", "-r").stdout.strip()
    assert kernel and kernel != os.uname().release


def test_crictl_logs_show_what_the_container_printed(
    tools: CriTools, cri_ctd: CriContainerd, crictl_pod: tuple[str, str]
) -> None:
    _, container = crictl_pod
    deadline = time.monotonic() + 30
    while "hello from husk" not in _crictl(tools, cri_ctd, "logs", container).stdout:
        assert time.monotonic() < deadline, "the container's line never reached its log"
        time.sleep(0.5)


def test_crictl_stats_report_the_containers_memory(
    tools: CriTools, cri_ctd: CriContainerd, crictl_pod: tuple[str, str]
) -> None:
    _, container = crictl_pod
    stats = json.loads(_crictl(tools, cri_ctd, "stats", "-o", "json", "--id", container).stdout)
    (entry,) = stats["stats"]
    assert int(entry["memory"]["workingSetBytes"]["value"]) > 0


# ---- bad input: one line each ----


def test_a_container_of_an_image_no_registry_has_fails_in_one_line(
    tools: CriTools, cri_ctd: CriContainerd
) -> None:
    missing = f"{critest_images.UPSTREAMS[0]}/{critest_images.E2E}/no-such-image:1"
    result = _crictl(tools, cri_ctd, "pull", missing, check=False)
    assert result.returncode != 0
    assert "no-such-image" in result.stderr and "not found" in result.stderr


def test_a_pod_for_an_unknown_runtime_handler_is_refused_in_one_line(
    tools: CriTools, cri_ctd: CriContainerd, work: Path
) -> None:
    pod_json = work / "unknown.json"
    pod_json.write_text(json.dumps({"metadata": {"name": "u", "namespace": "default",
                                                 "uid": "u-uid"}, "linux": {}}))  # fmt: skip
    result = _crictl(tools, cri_ctd, "runp", "--runtime", "no-such-handler", str(pod_json),
                     check=False)  # fmt: skip
    assert result.returncode != 0
    assert "no-such-handler" in result.stderr


def test_an_exec_into_a_container_that_has_exited_fails_in_one_line(
    tools: CriTools, cri_ctd: CriContainerd, crictl_pod: tuple[str, str], work: Path
) -> None:
    pod, _ = crictl_pod
    done_json = work / "done.json"
    done_json.write_text(json.dumps({
        "metadata": {"name": "done"},
        "image": {"image": f"{critest_images.UPSTREAMS[0]}/{critest_images.E2E}/busybox:1.29-2"},
        "command": ["true"], "linux": {},
    }))  # fmt: skip
    container = _crictl(tools, cri_ctd, "create", pod, str(done_json), str(work / "pod.json"))
    container_id = container.stdout.strip()
    _crictl(tools, cri_ctd, "start", container_id)
    deadline = time.monotonic() + 60
    while "CONTAINER_EXITED" not in _crictl(tools, cri_ctd, "inspect", container_id).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    result = _crictl(tools, cri_ctd, "exec", container_id, "true", check=False)
    assert result.returncode != 0
    # crictl logs the error twice (klog, then logrus); each record is one line, so
    # nothing of the runtime's message spills onto lines of its own
    records = result.stderr.strip().splitlines()
    assert all(re.match(r"time=|[EWI]\d{4} ", line) for line in records), result.stderr
    # containerd's CRI answers from its own record of the container's state before
    # it asks the shim (whose own answer is "container <id> is not running")
    assert "CONTAINER_EXITED" in records[-1] or "not running" in records[-1]
