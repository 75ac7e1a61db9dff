"""containerd 2's shim protocol: ``start``'s stdin and answer, ``-info``, task API v3.

The protos are checked against upstream's names and field numbers
(containerd api v1.12.0: ``runtime/bootstrap/v1/bootstrap.proto``,
``types/introspection.proto``, ``runtime/task/v3/shim.proto``), and ``start``
against the bytes real containerds wrote to its stdin for
``ctr run --runtime io.containerd.husk.v2 --runtime-config-path /etc/husk/golden.toml
--rm busybox golden true`` (``data/containerd_*_start_stdin.bin``; 1.6.20 wrote
the same bytes as 1.7.24).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from agent_proto import bootstrap_pb2, introspection_pb2, runtime_options_pb2, task_pb2, task_v3_pb2
from shim.containerd import bootstrap, options, serve
from shim.containerd.info import FEATURES_TYPE_URL, RUNTIME_NAME, runtime_info
from ttrpc import Server

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
#: what containerd 2.4.2 wrote to start's stdin (a BootstrapParams) and 1.7.24 (an Any)
STDIN_2_4 = (DATA / "containerd_2_4_2_start_stdin.bin").read_bytes()
STDIN_1_7 = (DATA / "containerd_1_7_24_start_stdin.bin").read_bytes()
GOLDEN = Path("/etc/husk/golden.toml")


def _fields(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def _options(config_path: str) -> any_pb2.Any:
    inner = runtime_options_pb2.Options(config_path=config_path).SerializeToString()
    return any_pb2.Any(type_url="runtimeoptions.v1.Options", value=inner)


def _params(
    task_id: str = "c1", namespace: str = "k8s.io", **kw: object
) -> bootstrap_pb2.BootstrapParams:
    return bootstrap_pb2.BootstrapParams(
        instance_id=task_id,
        namespace=namespace,
        containerd_version="2.4.2",
        **kw,  # type: ignore[arg-type]
    )


# ---- the protos are upstream's ----


def test_bootstrap_messages_have_upstreams_names_and_numbers() -> None:
    assert bootstrap_pb2.DESCRIPTOR.package == "containerd.runtime.bootstrap.v1"
    assert _fields(bootstrap_pb2.BootstrapParams) == {
        "instance_id": 1, "namespace": 2, "log_level": 3, "containerd_version": 4,
        "containerd_ttrpc_address": 5, "containerd_grpc_address": 6, "containerd_binary": 7,
        "extensions": 8, "socket_dir": 9,
    }  # fmt: skip
    assert _fields(bootstrap_pb2.Extension) == {"value": 1}
    assert _fields(bootstrap_pb2.BootstrapResult) == {
        "version": 1, "address": 2, "protocol": 3, "capabilities": 4, "metadata": 5,
        "extensions": 6,
    }  # fmt: skip
    assert bootstrap_pb2.LogLevel.Value("LOG_LEVEL_DEBUG") == -4


def test_runtime_info_has_upstreams_names_and_numbers() -> None:
    assert introspection_pb2.RuntimeInfo.DESCRIPTOR.full_name == "containerd.types.RuntimeInfo"
    assert _fields(introspection_pb2.RuntimeInfo) == {
        "name": 1, "version": 2, "options": 3, "features": 4, "annotations": 5,
    }  # fmt: skip
    assert _fields(introspection_pb2.RuntimeVersion) == {"version": 1, "revision": 2}
    assert _fields(introspection_pb2.RuntimeRequest) == {"runtime_path": 1, "options": 2}


def test_task_v3_is_v2_under_another_package_with_the_same_rpcs_and_messages() -> None:
    v2 = task_pb2.DESCRIPTOR.services_by_name["Task"]
    v3 = task_v3_pb2.DESCRIPTOR.services_by_name["Task"]
    assert v3.full_name == "containerd.task.v3.Task"
    assert [(m.name, m.input_type, m.output_type) for m in v3.methods] == [
        (m.name, m.input_type, m.output_type) for m in v2.methods
    ]


def test_the_serving_shim_answers_both_task_services_with_the_same_handlers() -> None:
    class Service:
        async def Connect(self, request: object, ctx: object) -> None: ...

    server = Server()
    for descriptor in serve.TASK_SERVICES:
        server.register(descriptor, Service())
    v2 = server.registry.lookup("containerd.task.v2.Task", "Connect")
    v3 = server.registry.lookup("containerd.task.v3.Task", "Connect")
    assert v2.request_type is v3.request_type is task_pb2.ConnectRequest


# ---- start's stdin ----


def test_containerd_2_4s_bootstrap_params_carry_the_handlers_config_path() -> None:
    start = bootstrap.parse(STDIN_2_4, "golden", "default")
    assert start.bootstrap
    assert options.parse(start.runtime_options) == GOLDEN


def test_containerd_1_7s_runtime_options_are_not_taken_for_bootstrap_params() -> None:
    start = bootstrap.parse(STDIN_1_7, "golden", "default")
    assert not start.bootstrap and start.runtime_options == STDIN_1_7
    assert options.parse(start.runtime_options) == GOLDEN


def test_an_options_any_stays_one_even_for_a_task_named_like_its_type() -> None:
    data = _options("/x.toml").SerializeToString()
    assert not bootstrap.parse(data, "runtimeoptions.v1.Options", "default").bootstrap


def test_no_stdin_is_the_legacy_form_without_options() -> None:
    assert bootstrap.parse(b"", "c1", "default") == bootstrap.StartInput(b"", bootstrap=False)


def test_bootstrap_params_without_extensions_mean_no_options() -> None:
    start = bootstrap.parse(_params().SerializeToString(), "c1", "k8s.io")
    assert start.bootstrap and options.parse(start.runtime_options) is None


def test_bootstrap_params_with_only_id_and_namespace_are_recognised_by_them() -> None:
    bare = bootstrap_pb2.BootstrapParams(instance_id="c1", namespace="k8s.io").SerializeToString()
    assert bootstrap.parse(bare, "c1", "k8s.io").bootstrap


def test_bootstrap_params_for_another_task_fail_start_in_one_line() -> None:
    with pytest.raises(bootstrap.BootstrapMismatchError) as failure:
        bootstrap.parse(STDIN_2_4, "other", "default")
    message = str(failure.value)
    assert "'golden'" in message and "-id 'other'" in message and "\n" not in message


def test_bootstrap_params_for_another_namespace_fail_start() -> None:
    with pytest.raises(bootstrap.BootstrapMismatchError, match=r"-namespace 'k8s\.io'"):
        bootstrap.parse(STDIN_2_4, "golden", "k8s.io")


def test_another_runtimes_options_inside_bootstrap_params_are_refused_by_name() -> None:
    runc = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"")
    params = _params(extensions=[bootstrap_pb2.Extension(value=runc)])
    start = bootstrap.parse(params.SerializeToString(), "c1", "k8s.io")
    with pytest.raises(options.RuntimeOptionsError, match=r"containerd\.runc\.v1\.Options"):
        options.parse(start.runtime_options)


# ---- start's answer ----


def test_a_bootstrap_caller_is_answered_with_a_version_3_ttrpc_result() -> None:
    start = bootstrap.StartInput(b"", bootstrap=True)
    result = bootstrap_pb2.BootstrapResult.FromString(
        bootstrap.reply("unix:///run/husk/c1/shim.sock", start)
    )
    assert (result.version, result.address, result.protocol) == (
        3, "unix:///run/husk/c1/shim.sock", "ttrpc",
    )  # fmt: skip


def test_with_a_vm_per_container_even_a_bootstrap_caller_gets_version_2() -> None:
    start = bootstrap.StartInput(b"", bootstrap=True)
    answer = bootstrap.reply("unix:///run/husk/c1/shim.sock", start, pods_share_a_shim=False)
    assert answer == b"unix:///run/husk/c1/shim.sock"


def test_a_legacy_caller_is_answered_with_the_plain_address() -> None:
    start = bootstrap.StartInput(STDIN_1_7, bootstrap=False)
    assert (
        bootstrap.reply("unix:///run/husk/c1/shim.sock", start) == b"unix:///run/husk/c1/shim.sock"
    )


def test_start_with_bootstrap_params_for_another_task_fails_in_one_line_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state}"\n')
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "shim.containerd.main", "-namespace", "default", "-id", "other",
         "start"],
        input=STDIN_2_4, cwd=bundle, capture_output=True, timeout=60, check=False,
        env={"HUSK_CONFIG": str(config), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == b""
    line = proc.stderr.decode()
    assert "BootstrapParams" in line and "'other'" in line and "\n" not in line
    assert list(bundle.iterdir()) == [] and not state.exists()


# ---- -info ----


def test_info_names_husk_and_says_idmapped_mounts_are_unavailable() -> None:
    info = runtime_info(b"")
    assert info.name == RUNTIME_NAME == "io.containerd.husk.v2"
    assert info.version.version and not info.HasField("options")
    assert info.features.type_url == FEATURES_TYPE_URL
    features = json.loads(info.features.value)
    assert features["ociVersionMin"] == "1.0.0"
    assert features["linux"]["mountExtensions"]["idmap"]["enabled"] is False


def test_info_offers_recursive_read_only_mounts_so_the_cri_allows_them() -> None:
    # containerd's CRI sets RecursiveReadOnlyMounts for a handler whose
    # features list "rro" (and refuses such a volume otherwise)
    features = json.loads(runtime_info(b"").features.value)
    assert "rro" in features["mountOptions"] and "ro" in features["mountOptions"]


def test_info_returns_the_options_it_was_given() -> None:
    info = runtime_info(STDIN_1_7)
    assert info.options.SerializeToString() == STDIN_1_7


def test_info_binary_prints_a_runtime_info_protobuf() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shim.containerd.main", "-info"],
        input=STDIN_1_7, cwd=ROOT, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    info = introspection_pb2.RuntimeInfo.FromString(proc.stdout)
    assert info.name == RUNTIME_NAME
    assert options.parse(info.options.SerializeToString()) == GOLDEN


def test_info_with_unusable_options_fails_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shim.containerd.main", "-info"],
        input=_options("relative.toml").SerializeToString(), cwd=ROOT, capture_output=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == b""
    assert (
        proc.stderr.decode()
        == "husk: runtime options: ConfigPath relative.toml is not an absolute path"
    )
