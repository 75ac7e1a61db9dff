"""The shim binary's contract with containerd: flags, ``delete`` output, records, cleanup."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent_proto import oci_pb2, task_pb2
from shim.containerd import main as shim_main
from shim.resources import PROCESS, Resource, process_start_time
from shim.sandbox import cleanup, oci
from shim.sandbox.annotations import CONTAINER_TYPE, SANDBOX_ID, placement
from shim.sandbox.state import SandboxState, find_container

ROOT = Path(__file__).resolve().parents[2]


def test_flags_as_containerd_passes_them(tmp_path: Path) -> None:
    argv = [
        "-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
        "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start",
    ]  # fmt: skip
    args, action, _ = shim_main.parse(argv)
    assert (args.namespace, args.id, args.debug, action) == ("k8s.io", "abc", True, "start")
    assert args.publish_binary == "/usr/bin/containerd"
    args, action, _ = shim_main.parse(["-id", "x", "-bundle", str(tmp_path), "delete"])
    assert (args.bundle, action) == (str(tmp_path), "delete")
    # 1.7 flags this shim does not use are accepted
    _, action, _ = shim_main.parse(["-id", "x", "-socket", "/s", "-bootstrap", "start"])
    assert action == "start"


def test_delete_prints_a_delete_response_with_137(tmp_path: Path) -> None:
    config = tmp_path / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path / "state"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "shim.containerd.main", "-namespace", "default", "-id", "gone",
         "-bundle", str(tmp_path), "delete"],
        cwd=ROOT, capture_output=True, check=True,
        env={"HUSK_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    response = task_pb2.DeleteResponse.FromString(proc.stdout)
    assert response.exit_status == 137
    assert response.exited_at.seconds > 0


def test_placement_from_cri_annotations() -> None:
    pod = {"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}}
    assert placement("p1", pod).owner
    member = {"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "p1"}}
    assert placement("c1", member) == placement("c1", member, "pod")
    assert placement("c1", member).sandbox_id == "p1" and not placement("c1", member).owner
    assert placement("c1", member, "container").sandbox_id == "c1"
    assert placement("c1", {}).owner


def test_state_records_survive_reload_and_find_containers(tmp_path: Path) -> None:
    state = SandboxState.create(tmp_path, "s1", "default")
    state.add_container("c9")
    state.record(Resource(kind="mount", path="/x"))
    again = SandboxState.load(tmp_path / "s1")
    assert again.containers == ["c9"] and again.resources == [Resource(kind="mount", path="/x")]
    found = find_container(tmp_path, "c9")
    assert found is not None and found.id == "s1"


def test_reclaim_kills_what_names_the_dir_and_removes_it(tmp_path: Path) -> None:
    state = SandboxState.create(tmp_path, "s2")
    marker = state.dir / "vm.sock"
    # "; :" keeps the shell (and the marker in its argv): a lone command may be exec'd
    proc = subprocess.Popen(["sh", "-c", "sleep 300; :", str(marker)])
    other = subprocess.Popen(["sleep", "300"])
    try:
        state.record(Resource(kind=PROCESS, pid=other.pid, start=process_start_time(other.pid)))
        assert cleanup.orphans(tmp_path) == [SandboxState.load(state.dir)]
        assert cleanup.reclaim(state) == []
        assert proc.wait(timeout=5) == -9
        assert other.wait(timeout=5) == -9
        assert not state.dir.exists()
    finally:
        proc.kill()
        other.kill()


def test_oci_conversion_matches_keys_case_insensitively() -> None:
    spec = oci.spec_from_json(
        {
            "process": {
                "args": ["sh"],
                "consoleSize": {"height": 5, "width": 7},
                "oomScoreAdj": -5,
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 5}],
            },
            "linux": {
                "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "resources": {"memory": {"limit": 1 << 20}, "cpu": {"quota": -1}},
            },
            "annotations": {"a": "b"},
        }
    )
    assert isinstance(spec, oci_pb2.Spec)
    assert spec.Process.ConsoleSize.Width == 7 and spec.Process.OOMScoreAdj == -5
    assert spec.Process.Rlimits[0].Hard == 10
    assert spec.Linux.UIDMappings[0].HostID == 1000
    assert spec.Linux.Sysctl["net.ipv4.ip_forward"] == "1"
    assert spec.Linux.Resources.Memory.Limit == 1 << 20
    assert spec.Annotations["a"] == "b"


def test_bundle_without_config_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"no config\.json"):
        oci.read_bundle_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(Exception, match="not a JSON object"):
        oci.read_bundle_spec(tmp_path)


def test_start_refuses_a_pod_sandbox_id_that_would_lead_the_socket_path_elsewhere(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "a" / "state"
    state_dir.mkdir(parents=True)
    config = tmp_path / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state_dir}"\n')
    # someone listens where the hostile id leads: <state_dir>/../../elsewhere/x/shim.sock
    elsewhere = tmp_path / "elsewhere" / "x"
    elsewhere.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(elsewhere / "shim.sock"))
    listener.listen(1)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    annotations = {CONTAINER_TYPE: "container", SANDBOX_ID: "../../elsewhere/x"}
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "shim.containerd.main", "-namespace", "k8s.io", "-id", "c1",
             "-bundle", str(bundle), "start"],
            cwd=bundle, capture_output=True, stdin=subprocess.DEVNULL, timeout=60,
            env={"HUSK_CONFIG": str(config), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    finally:
        listener.close()
    assert proc.returncode != 0 and proc.stdout == b""
    message = proc.stderr.decode()
    assert "\n" not in message.strip() and SANDBOX_ID in message and "invalid" in message
    assert not (bundle / "address").exists()
    assert not any(state_dir.iterdir())
