"""Service registration from generated descriptors."""

from __future__ import annotations

import pytest
from google.protobuf import empty_pb2, wrappers_pb2

from agent_proto import task_pb2
from tests.unit.test_ttrpc_support import PROBE, SERVICE, ProbeService
from ttrpc import ServiceRegistry, UnknownMethod

TASK = task_pb2.DESCRIPTOR.services_by_name["Task"]


def test_register_maps_rpc_names_to_message_types_and_handlers() -> None:
    registry = ServiceRegistry()
    service = ProbeService()
    registry.register(PROBE, service)
    spec = registry.lookup(SERVICE, "Meta")
    assert spec.request_type is empty_pb2.Empty
    assert spec.response_type is wrappers_pb2.StringValue
    assert spec.handler == service.Meta
    assert spec.is_unary


def test_register_records_streaming_shape_from_the_descriptor() -> None:
    registry = ServiceRegistry()
    registry.register(PROBE, ProbeService())
    shapes = {
        name: (
            registry.lookup(SERVICE, name).client_streaming,
            registry.lookup(SERVICE, name).server_streaming,
        )
        for name in ("Split", "Join", "Chat")
    }
    assert shapes == {"Split": (False, True), "Join": (True, False), "Chat": (True, True)}


def test_partial_implementation_registers_only_defined_methods() -> None:
    class StateOnly:
        async def State(self, request: object, ctx: object) -> object:
            return request

    registry = ServiceRegistry()
    assert registry.register(TASK, StateOnly()) == ["State"]
    with pytest.raises(
        UnknownMethod, match=r"unknown method Create of service containerd\.task\.v2\.Task"
    ):
        registry.lookup("containerd.task.v2.Task", "Create")


def test_implementation_with_no_matching_method_is_refused_naming_the_rpcs() -> None:
    class SnakeCase:
        async def state(self, request: object, ctx: object) -> object:
            return request

    with pytest.raises(ValueError, match="named exactly like the RPCs: State, Create"):
        ServiceRegistry().register(TASK, SnakeCase())


def test_registering_a_service_twice_is_refused() -> None:
    registry = ServiceRegistry()
    registry.register(PROBE, ProbeService())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(PROBE, ProbeService())


def test_unknown_service_lookup_names_the_service() -> None:
    with pytest.raises(UnknownMethod, match=r"unknown service no\.Such"):
        ServiceRegistry().lookup("no.Such", "Thing")
