"""The runtime options containerd writes to ``start``'s stdin: a handler's ConfigPath."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from agent_proto import runtime_options_pb2
from shim.containerd import options


def _encoded(config_path: str, type_url: str = "runtimeoptions.v1.Options") -> bytes:
    inner = runtime_options_pb2.Options(config_path=config_path).SerializeToString()
    return any_pb2.Any(type_url=type_url, value=inner).SerializeToString()


def test_config_path_is_read_from_containerds_any() -> None:
    assert options.parse(_encoded("/etc/husk/t.toml")) == Path("/etc/husk/t.toml")


def test_a_type_url_with_a_domain_prefix_is_accepted() -> None:
    data = _encoded("/x.toml", "type.googleapis.com/runtimeoptions.v1.Options")
    assert options.parse(data) == Path("/x.toml")


def test_no_options_means_the_usual_config_lookup() -> None:
    assert options.parse(b"") is None
    assert options.parse(_encoded("")) is None


def test_options_of_another_runtime_are_refused_by_name() -> None:
    with pytest.raises(options.RuntimeOptionsError, match=r"containerd\.runc\.v1\.Options"):
        options.parse(_encoded("/x.toml", "containerd.runc.v1.Options"))


def test_garbage_on_stdin_is_refused_in_one_line() -> None:
    with pytest.raises(options.RuntimeOptionsError, match="not a protobuf Any"):
        options.parse(b"\xff\xff\xff")


def test_a_relative_config_path_is_refused() -> None:
    with pytest.raises(options.RuntimeOptionsError, match="not an absolute path"):
        options.parse(_encoded("etc/husk.toml"))


def test_oversize_options_are_refused(tmp_path: Path) -> None:
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"\0" * (options.MAX_OPTIONS_BYTES + 1))
    with stdin.open("rb") as stream, pytest.raises(options.RuntimeOptionsError, match="exceed"):
        options.read(stream)


def test_start_records_the_path_for_delete(tmp_path: Path) -> None:
    options.record(str(tmp_path), Path("/etc/husk/t.toml"))
    assert options.recorded(str(tmp_path)) == Path("/etc/husk/t.toml")
    options.record(str(tmp_path), None)
    assert options.recorded(str(tmp_path)) is None


def test_start_with_a_broken_config_path_fails_in_one_line_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[runtime]\nhypervisor = 'qemu'\nno_such_key = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "shim.containerd.main", "-id", "c1", "-namespace", "ns", "start"],
        input=_encoded(str(broken)),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == b""
    line = proc.stderr.decode()
    assert "\n" not in line  # containerd quotes it inside its own one-line error
    assert str(broken) in line and "no_such_key" in line


def test_a_container_that_joined_its_pods_shim_without_start_uses_the_pods_record(
    tmp_path: Path,
) -> None:
    # containerd 2.3+ (task API v3) writes the pod's id in the bundle instead of running start
    pod, app = tmp_path / "pod1", tmp_path / "app1"
    pod.mkdir()
    app.mkdir()
    options.record(str(pod), Path("/etc/husk/t.toml"))
    (app / options.SANDBOX_FILE).write_text("pod1")
    assert options.recorded(str(app)) == Path("/etc/husk/t.toml")


def test_a_sandbox_file_cannot_point_outside_the_bundles_dir(tmp_path: Path) -> None:
    app = tmp_path / "tasks" / "app1"
    app.mkdir(parents=True)
    options.record(str(tmp_path), Path("/etc/husk/elsewhere.toml"))
    (app / options.SANDBOX_FILE).write_text("..")
    assert options.recorded(str(app)) is None
