"""agent_proto: the checked-in generated modules are fresh, complete and wire-correct."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor

import agent_proto
from agent_proto import generate as gen
from agent_proto import status_pb2, task_pb2, ttrpc_pb2

PACKAGE_DIR = Path(agent_proto.__file__).resolve().parent
REGENERATE = "python -m agent_proto.generate"

EXPECTED_PROTOS = {
    "agent",
    "bootstrap",
    "cgroups_v2",
    "cri_pod",
    "events",
    "events_ttrpc",
    "health",
    "introspection",
    "mount",
    "oci",
    "runtime_options",
    "sandbox",
    "status",
    "task",
    "task_types",
    "task_v3",
    "ttrpc",
    "types",
}

TASK_METHODS = [
    "State",
    "Create",
    "Start",
    "Delete",
    "Pids",
    "Pause",
    "Resume",
    "Checkpoint",
    "Kill",
    "Exec",
    "ResizePty",
    "CloseIO",
    "Update",
    "Wait",
    "Stats",
    "Connect",
    "Shutdown",
]

AGENT_METHODS_REQUIRED = [
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "UpdateContainer",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
    "UpdateInterface",
    "UpdateRoutes",
    "ListInterfaces",
    "ListRoutes",
    "AddARPNeighbors",
    "CreateSandbox",
    "DestroySandbox",
    "ResetSandbox",
    "OnlineCPUMem",
    "GetGuestDetails",
    "CopyFile",
]


def _module(stem: str) -> ModuleType:
    return importlib.import_module(f"agent_proto.{stem}_pb2")


def _all_services() -> dict[str, descriptor.ServiceDescriptor]:
    services: dict[str, descriptor.ServiceDescriptor] = {}
    for stem in sorted(EXPECTED_PROTOS):
        for service in _module(stem).DESCRIPTOR.services_by_name.values():
            services[service.full_name] = service
    return services


def _ttrpc_paths() -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for service in _all_services().values()
        for method in service.methods
    }


# --- (a) freshness -----------------------------------------------------------------


def _stale_files(fresh_dir: Path, checked_in_dir: Path) -> list[str]:
    stale = []
    for name in gen.generated_names():
        checked_in = checked_in_dir / name
        fresh = fresh_dir / name
        if not checked_in.is_file() or checked_in.read_bytes() != fresh.read_bytes():
            stale.append(name)
    return stale


def test_checked_in_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    stale = _stale_files(tmp_path, PACKAGE_DIR)
    assert not stale, (
        f"generated modules are stale or missing: {', '.join(stale)}; "
        f"run `{REGENERATE}` and commit the result"
    )


def test_staleness_check_notices_an_edited_proto(tmp_path: Path) -> None:
    # Guard against a comparison that can never fail: change one field number in a
    # copy of the sources and the fresh output must differ from what is checked in.
    copy = tmp_path / "src" / "agent_proto"
    copy.mkdir(parents=True)
    for proto in gen.proto_sources():
        shutil.copy(proto, copy / proto.name)
    ttrpc_proto = copy / "ttrpc.proto"
    text = ttrpc_proto.read_text()
    assert "int64 timeout_nano = 4;" in text
    ttrpc_proto.write_text(text.replace("int64 timeout_nano = 4;", "int64 timeout_nano = 6;"))
    pristine, edited = tmp_path / "pristine", tmp_path / "edited"
    gen.generate(pristine)
    gen.generate(edited, package_dir=copy)
    assert _stale_files(edited, pristine) == ["ttrpc_pb2.py"]


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    gen.generate(first)
    gen.generate(second)
    for name in gen.generated_names():
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_generate_out_leaves_the_package_untouched(tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in PACKAGE_DIR.iterdir() if p.is_file()}
    assert gen.main(["--out", str(tmp_path / "new")]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in PACKAGE_DIR.iterdir() if p.is_file()}
    assert before == after
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == gen.generated_names()


def test_protoc_errors_are_reported(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "agent_proto"
    broken.mkdir(parents=True)
    (broken / "bad.proto").write_text('syntax = "proto3";\nmessage Bad { nosuchtype x = 1; }\n')
    with pytest.raises(gen.GenerateError, match=r"agent_proto/bad\.proto"):
        gen.generate(tmp_path / "out", package_dir=broken)


# --- (b) completeness --------------------------------------------------------------


def test_every_proto_has_modules_and_every_module_has_a_proto() -> None:
    protos = {p.stem for p in PACKAGE_DIR.glob("*.proto")}
    assert protos == EXPECTED_PROTOS
    for suffix in gen.GENERATED_SUFFIXES:
        modules = {p.name.removesuffix(suffix) for p in PACKAGE_DIR.glob("*" + suffix)}
        assert modules == protos, f"*{suffix} out of step with *.proto; run `{REGENERATE}`"


@pytest.mark.parametrize("stem", sorted(EXPECTED_PROTOS))
def test_module_imports_and_names_its_source(stem: str) -> None:
    module = _module(stem)
    assert module.DESCRIPTOR.name == f"agent_proto/{stem}.proto"


def test_imports_are_our_own_protos_or_well_known_types() -> None:
    for proto in gen.proto_sources():
        module = _module(proto.stem)
        for dep in module.DESCRIPTOR.dependencies:
            assert dep.name.startswith(("agent_proto/", "google/protobuf/")), (proto, dep.name)


# --- (c) service and method names as ttrpc routes them ----------------------------


def test_task_service_has_all_17_methods() -> None:
    service = _all_services()["containerd.task.v2.Task"]
    assert [m.name for m in service.methods] == TASK_METHODS
    create = service.methods_by_name["Create"]
    assert create.input_type.full_name == "containerd.task.v2.CreateTaskRequest"
    assert create.output_type.full_name == "containerd.task.v2.CreateTaskResponse"
    shutdown = service.methods_by_name["Shutdown"]
    assert shutdown.output_type.full_name == "google.protobuf.Empty"


def test_ttrpc_paths_exist() -> None:
    paths = _ttrpc_paths()
    expected = {
        "/containerd.task.v2.Task/Create",
        "/containerd.task.v2.Task/Shutdown",
        "/containerd.task.v3.Task/Create",
        "/containerd.task.v3.Task/Shutdown",
        "/containerd.services.events.ttrpc.v1.Events/Forward",
        "/grpc.Health/Check",
        "/grpc.Health/Version",
    }
    expected |= {f"/grpc.AgentService/{name}" for name in AGENT_METHODS_REQUIRED}
    assert expected <= paths, sorted(expected - paths)


def test_health_service() -> None:
    service = _all_services()["grpc.Health"]
    assert [m.name for m in service.methods] == ["Check", "Version"]
    health_pb2 = _module("health")
    assert health_pb2.HealthCheckResponse.SERVING == 1
    assert set(health_pb2.VersionCheckResponse.DESCRIPTOR.fields_by_name) == {
        "grpc_version",
        "agent_version",
    }


def test_only_the_expected_services_exist() -> None:
    assert set(_all_services()) == {
        "containerd.task.v2.Task",
        "containerd.task.v3.Task",
        "containerd.runtime.sandbox.v1.Sandbox",
        "containerd.services.events.ttrpc.v1.Events",
        "grpc.AgentService",
        "grpc.Health",
    }


# --- wire compatibility: field numbers pinned to upstream --------------------------

FIELD_NUMBERS = [
    ("ttrpc.Request", {"service": 1, "method": 2, "payload": 3, "timeout_nano": 4, "metadata": 5}),
    ("ttrpc.Response", {"status": 1, "payload": 2}),
    ("google.rpc.Status", {"code": 1, "message": 2, "details": 3}),
    (
        "containerd.task.v2.CreateTaskRequest",
        {
            "id": 1,
            "bundle": 2,
            "rootfs": 3,
            "terminal": 4,
            "stdin": 5,
            "stdout": 6,
            "stderr": 7,
            "checkpoint": 8,
            "parent_checkpoint": 9,
            "options": 10,
        },
    ),
    (
        "containerd.task.v2.StateResponse",
        {
            "id": 1,
            "bundle": 2,
            "pid": 3,
            "status": 4,
            "stdin": 5,
            "stdout": 6,
            "stderr": 7,
            "terminal": 8,
            "exit_status": 9,
            "exited_at": 10,
            "exec_id": 11,
        },
    ),
    ("containerd.task.v2.ConnectResponse", {"shim_pid": 1, "task_pid": 2, "version": 3}),
    ("containerd.task.v2.UpdateTaskRequest", {"id": 1, "resources": 2, "annotations": 3}),
    ("containerd.types.Mount", {"type": 1, "source": 2, "target": 3, "options": 4}),
    (
        "containerd.events.TaskExit",
        {"container_id": 1, "id": 2, "pid": 3, "exit_status": 4, "exited_at": 5},
    ),
    (
        "containerd.services.events.ttrpc.v1.Envelope",
        {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4},
    ),
    ("grpc.CreateContainerRequest", {"container_id": 1, "exec_id": 2, "OCI": 6}),
    ("grpc.ReseedRandomDevRequest", {"data": 2}),
    ("grpc.FSGroup", {"group_id": 2, "group_change_policy": 3}),
    ("types.Interface", {"device": 1, "IPAddresses": 3, "pciPath": 6, "raw_flags": 8}),
]


def _message_descriptor(full_name: str) -> descriptor.Descriptor:
    for stem in EXPECTED_PROTOS:
        found = _module(stem).DESCRIPTOR.message_types_by_name
        package = _module(stem).DESCRIPTOR.package
        short = full_name.removeprefix(package + ".")
        if full_name.startswith(package + ".") and short in found:
            return found[short]  # type: ignore[no-any-return]
    raise KeyError(full_name)


@pytest.mark.parametrize(("message", "numbers"), FIELD_NUMBERS, ids=[m for m, _ in FIELD_NUMBERS])
def test_field_numbers_match_upstream(message: str, numbers: dict[str, int]) -> None:
    fields = _message_descriptor(message).fields_by_name
    assert {name: fields[name].number for name in numbers} == numbers


def test_task_status_enum_matches_containerd() -> None:
    task_types_pb2 = _module("task_types")
    assert dict(task_types_pb2.Status.items()) == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }


# --- (d) envelope round trip --------------------------------------------------------


def test_request_envelope_wire_bytes() -> None:
    request = ttrpc_pb2.Request(
        service="a",
        method="b",
        payload=b"c",
        timeout_nano=1,
        metadata=[ttrpc_pb2.KeyValue(key="k", value="v")],
    )
    # Hand-encoded: tag (field << 3 | wire type), length, bytes.
    assert request.SerializeToString() == bytes.fromhex(
        "0a0161 120162 1a0163 2001 2a06 0a016b 120176"
    )


def test_request_envelope_round_trip() -> None:
    inner = task_pb2.CreateTaskRequest(id="c1", bundle="/run/c1", terminal=True)
    request = ttrpc_pb2.Request(
        service="containerd.task.v2.Task",
        method="Create",
        payload=inner.SerializeToString(),
        timeout_nano=2_000_000_000,
        metadata=[ttrpc_pb2.KeyValue(key="containerd-namespace", value="default")],
    )
    decoded = ttrpc_pb2.Request.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.service == "containerd.task.v2.Task"
    assert decoded.timeout_nano == 2_000_000_000
    assert [(kv.key, kv.value) for kv in decoded.metadata] == [("containerd-namespace", "default")]
    assert task_pb2.CreateTaskRequest.FromString(decoded.payload) == inner


def test_response_envelope_round_trip_with_status() -> None:
    response = ttrpc_pb2.Response(
        status=status_pb2.Status(code=5, message="container c1: not found")
    )
    decoded = ttrpc_pb2.Response.FromString(response.SerializeToString())
    assert decoded.HasField("status")
    assert decoded.status.code == 5
    assert decoded.status.message == "container c1: not found"
    assert decoded.payload == b""
