"""The runtime-spec version the agent hands its runtime, and the runtime's name in errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from guest.agent import spec_version
from guest.agent.oci import runc_config
from guest.agent.reaper import Reaper
from guest.agent.runc import Runc, RuncError
from shim.errors import InvalidArgumentError
from shim.sandbox.oci import spec_from_json
from tests.unit.oci_samples import ctr_run_spec

#: what ``crun features`` says in crun 1.21 (Debian trixie)
CRUN_1_21_MAX = "1.1.0+dev"


@pytest.mark.parametrize(
    ("containerd", "written"), [("1.6.20", "1.0.2-dev"), ("1.7.24", "1.2.0"), ("2.1.9", "1.2.1")]
)
def test_each_containerd_writes_the_spec_version_it_was_built_with(
    containerd: str, written: str
) -> None:
    assert spec_from_json(ctr_run_spec(containerd)).Version == written


@pytest.mark.parametrize("containerd", ["1.7.24", "2.1.9"])
def test_a_new_containerds_spec_reaches_a_runtime_without_features_as_1_0_2(
    containerd: str,
) -> None:
    spec = spec_from_json(ctr_run_spec(containerd))
    version = spec_version.handed_version(spec.Version, spec_version.PRE_FEATURES_VERSION)
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/c1", oci_version=version)
    assert config["ociVersion"] == "1.0.2"
    assert config["process"]["args"] == ["/bin/sh", "-c", "sleep 30"]
    # the guest is cgroup v2: every container but a privileged one gets its cgroup namespace
    assert config["linux"]["namespaces"] == [
        {"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")
    ]


def test_a_runtime_that_knows_less_gets_its_own_newest_version() -> None:
    assert spec_version.handed_version("1.2.1", CRUN_1_21_MAX) == CRUN_1_21_MAX


def test_a_spec_older_than_the_runtime_keeps_its_version() -> None:
    assert spec_version.handed_version("1.0.2-dev", "1.2.0") == "1.0.2-dev"
    assert spec_version.handed_version("1.1.0", "1.1.0") == "1.1.0"


def test_a_prerelease_comes_before_its_release() -> None:
    # runc 1.1 says 1.0.2-dev; containerd 1.6 writes the same
    assert spec_version.handed_version("1.0.2", "1.0.2-dev") == "1.0.2-dev"
    assert spec_version.handed_version("1.0.2-dev", "1.0.2-dev") == "1.0.2-dev"


def test_a_spec_with_no_version_is_taken_as_1_0_2() -> None:
    assert spec_version.handed_version("", "1.2.0") == "1.0.2"


@pytest.mark.parametrize("version", ["2.0.0", "0.5.0"])
def test_an_unknown_spec_major_version_fails_in_one_line_naming_it(version: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        spec_version.handed_version(version, "1.2.0")
    message = str(caught.value)
    assert version in message and "runtime-spec 1.x" in message and "\n" not in message


def test_a_malformed_spec_version_fails_naming_it() -> None:
    with pytest.raises(InvalidArgumentError, match=r"'one\.two' is not a runtime-spec version"):
        spec_version.handed_version("one.two", "1.2.0")


def fake_runtime(tmp_path: Path, name: str, script: str) -> Path:
    """An executable ``name`` whose body is ``script`` (sh); it logs its argv."""
    binary = tmp_path / name
    binary.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n{script}\n')
    binary.chmod(0o755)
    return binary


async def ask_version_max(runtime: Path, root: Path, times: int = 1) -> list[str]:
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        runc = Runc(reaper, str(runtime), root, no_pivot=False)
        answers = [await runc.oci_version_max() for _ in range(times)]
        nursery.cancel_scope.cancel()
    return answers


async def test_the_runtime_is_asked_its_newest_version_once(tmp_path: Path) -> None:
    features = json.dumps({"ociVersionMin": "1.0.0", "ociVersionMax": CRUN_1_21_MAX})
    runtime = fake_runtime(tmp_path, "crun", f"echo '{features}'")
    assert await ask_version_max(runtime, tmp_path, times=3) == [CRUN_1_21_MAX] * 3
    assert (tmp_path / "calls").read_text() == "features\n"


async def test_a_runtime_without_features_is_taken_to_know_1_0_2(tmp_path: Path) -> None:
    # crun 1.8.1 (Debian 12): "crun: unknown command features", exit 1
    runtime = fake_runtime(tmp_path, "crun", "echo 'unknown command features' >&2; exit 1")
    assert await ask_version_max(runtime, tmp_path) == ["1.0.2"]


async def test_a_features_answer_without_a_version_is_taken_as_1_0_2(tmp_path: Path) -> None:
    runtime = fake_runtime(tmp_path, "crun", 'echo \'{"ociVersionMax": "latest"}\'')
    assert await ask_version_max(runtime, tmp_path) == ["1.0.2"]


async def test_a_runtime_error_names_the_runtime_that_ran(tmp_path: Path) -> None:
    runtime = fake_runtime(tmp_path, "crun", "echo 'container is not created' >&2; exit 1")
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        runc = Runc(reaper, str(runtime), tmp_path, no_pivot=False)
        with pytest.raises(RuncError) as caught:
            await runc.start("c1")
        nursery.cancel_scope.cancel()
    assert str(caught.value) == "crun start of container 'c1' failed: container is not created"
