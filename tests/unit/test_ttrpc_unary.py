"""Unary calls between husk's ttrpc server and client."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
import trio
import trio.testing
from google.protobuf import empty_pb2, wrappers_pb2

from agent_proto import task_pb2
from tests.unit.test_ttrpc_support import PROBE, SERVICE, connected, probe_server
from ttrpc import (
    CallContext,
    Client,
    Code,
    ConnectionClosed,
    DeadlineExceeded,
    MessageTooLarge,
    RpcError,
    Server,
)
from ttrpc.frame import MAX_MESSAGE_SIZE

TASK = task_pb2.DESCRIPTOR.services_by_name["Task"]


class _TaskState:
    async def State(
        self, request: task_pb2.StateRequest, ctx: CallContext
    ) -> task_pb2.StateResponse:
        return task_pb2.StateResponse(id=request.id, pid=4242, bundle="/run/" + request.id)


async def test_unary_round_trip_with_generated_task_service() -> None:
    server = Server()
    server.register(TASK, _TaskState())
    async with connected(server) as client:
        response = await client.call(
            "containerd.task.v2.Task",
            "State",
            task_pb2.StateRequest(id="c1"),
            task_pb2.StateResponse,
        )
    assert (response.id, response.pid, response.bundle) == ("c1", 4242, "/run/c1")


async def test_stub_calls_rpcs_by_name() -> None:
    server = Server()
    server.register(TASK, _TaskState())
    async with connected(server) as client:
        response = await client.stub(TASK).State(task_pb2.StateRequest(id="c2"))
    assert response.pid == 4242


async def test_metadata_reaches_handler_as_lists() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        reply = await client.call(
            SERVICE,
            "Meta",
            empty_pb2.Empty(),
            wrappers_pb2.StringValue,
            metadata={"containerd-namespace": "k8s.io", "trace": ["a", "b"]},
        )
    assert json.loads(reply.value) == {"containerd-namespace": ["k8s.io"], "trace": ["a", "b"]}


async def test_handler_context_names_service_and_method() -> None:
    server, service = probe_server()
    async with connected(server) as client:
        await client.call(SERVICE, "Meta", empty_pb2.Empty(), wrappers_pb2.StringValue)
    assert (service.contexts[0].service, service.contexts[0].method) == (SERVICE, "Meta")


async def test_timeout_is_sent_to_the_server(autojump_clock: trio.testing.MockClock) -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        reply = await client.call(
            SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=0), wrappers_pb2.DoubleValue, timeout=5
        )
    assert 4.9 < reply.value <= 5


async def test_call_past_its_timeout_raises_deadline_exceeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, service = probe_server()
    async with connected(server) as client:
        with pytest.raises(DeadlineExceeded) as raised:
            await client.call(
                SERVICE,
                "Sleep",
                wrappers_pb2.DoubleValue(value=60),
                wrappers_pb2.DoubleValue,
                timeout=1,
            )
        assert raised.value.code is Code.DEADLINE_EXCEEDED
        assert trio.current_time() == pytest.approx(1)
        # the server enforced the same deadline: the handler never finished
        await trio.sleep(120)
    assert (service.started, service.finished) == (1, 0)


async def test_husk_error_reaches_the_client_with_its_code() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(RpcError) as raised:
            await client.call(
                SERVICE, "Fail", wrappers_pb2.StringValue(value="notfound"), empty_pb2.Empty
            )
    assert (raised.value.code, raised.value.message) == (Code.NOT_FOUND, "container c1 not found")


async def test_unknown_method_is_unimplemented_naming_it() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(RpcError) as raised:
            await client.call(SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty)
    assert raised.value.code is Code.UNIMPLEMENTED
    assert "Nope" in raised.value.message


async def test_unknown_service_is_unimplemented_naming_it() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(RpcError) as raised:
            await client.call("no.Such", "Thing", empty_pb2.Empty(), empty_pb2.Empty)
    assert raised.value.code is Code.UNIMPLEMENTED
    assert "no.Such" in raised.value.message


async def test_unexpected_exception_is_internal_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(RpcError) as raised:
            await client.call(
                SERVICE, "Fail", wrappers_pb2.StringValue(value="boom"), empty_pb2.Empty
            )
    assert raised.value.code is Code.INTERNAL
    assert raised.value.message == "ValueError: secret internals"
    assert "Traceback" not in raised.value.message
    assert any(record.exc_info for record in caplog.records if record.name == "husk.ttrpc")


async def test_handler_returning_wrong_type_is_internal() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(RpcError) as raised:
            await client.call(
                SERVICE, "Fail", wrappers_pb2.StringValue(value="none"), empty_pb2.Empty
            )
    assert raised.value.code is Code.INTERNAL
    assert "returned NoneType" in raised.value.message


async def test_concurrent_calls_complete_out_of_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, _ = probe_server()
    finished: list[float] = []

    async def sleep(client: Client, seconds: float) -> None:
        await client.call(
            SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=seconds), wrappers_pb2.DoubleValue
        )
        finished.append(seconds)

    async with connected(server) as client, trio.open_nursery() as nursery:
        for seconds in (3, 1, 2):
            nursery.start_soon(sleep, client, seconds)
    assert finished == [1, 2, 3]
    assert trio.current_time() == pytest.approx(3)


async def test_broken_connection_fails_pending_and_later_calls() -> None:
    server, service = probe_server()
    client_end, server_end = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []

    async def pending_call(client: Client) -> None:
        try:
            await client.call(
                SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=60), wrappers_pb2.DoubleValue
            )
        except ConnectionClosed as exc:
            errors.append(exc)

    async with Client.open(client_end) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, server_end)
            for _ in range(3):
                nursery.start_soon(pending_call, client)
            await trio.testing.wait_all_tasks_blocked()
            assert service.started == 3
            await server_end.aclose()
        assert len(errors) == 3
        assert all(error.code is Code.UNAVAILABLE for error in errors)
        assert "server closed the connection" in str(errors[0])
        with pytest.raises(ConnectionClosed, match="server closed the connection"):
            await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)


async def test_cancelled_call_removes_its_pending_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with trio.move_on_after(0.05):
            await client.call(
                SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=60), wrappers_pb2.DoubleValue
            )
        assert client._pending == {}
        # the connection still works after the abandoned call
        reply = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="hi"), wrappers_pb2.StringValue
        )
    assert reply.value == "hi"


async def test_oversize_request_fails_that_call_with_resource_exhausted() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(MessageTooLarge) as raised:
            await client.call(
                SERVICE,
                "Echo",
                wrappers_pb2.StringValue(value="x" * MAX_MESSAGE_SIZE),
                wrappers_pb2.StringValue,
            )
        assert raised.value.code is Code.RESOURCE_EXHAUSTED
        reply = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="ok"), wrappers_pb2.StringValue
        )
    assert reply.value == "ok"


async def test_oversize_response_fails_that_call_with_resource_exhausted() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(RpcError) as raised:
            await client.call(
                SERVICE,
                "Big",
                wrappers_pb2.Int64Value(value=MAX_MESSAGE_SIZE),
                wrappers_pb2.BytesValue,
            )
        assert raised.value.code is Code.RESOURCE_EXHAUSTED
        reply = await client.call(
            SERVICE, "Big", wrappers_pb2.Int64Value(value=1000), wrappers_pb2.BytesValue
        )
    assert len(reply.value) == 1000


async def test_graceful_shutdown_finishes_in_flight_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, service = probe_server()
    replies: list[float] = []

    async def slow_call(client: Client) -> None:
        reply = await client.call(
            SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=2), wrappers_pb2.DoubleValue
        )
        replies.append(reply.value)

    async with connected(server) as client, trio.open_nursery() as nursery:
        nursery.start_soon(slow_call, client)
        await trio.testing.wait_all_tasks_blocked()
        await server.shutdown(timeout=10)
        assert trio.current_time() == pytest.approx(2)
        assert server.connection_count == 0
    assert replies == [-1]
    assert service.finished == 1


async def test_shutdown_cancels_calls_still_running_after_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, service = probe_server()
    async with connected(server) as client, trio.open_nursery() as nursery:

        async def stuck_call() -> None:
            with pytest.raises(ConnectionClosed):
                await client.call(
                    SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=600), wrappers_pb2.DoubleValue
                )

        nursery.start_soon(stuck_call)
        await trio.testing.wait_all_tasks_blocked()
        await server.shutdown(timeout=5)
        assert trio.current_time() == pytest.approx(5)
    assert service.finished == 0


async def test_calls_after_shutdown_began_are_refused_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, _ = probe_server()
    async with connected(server) as client, trio.open_nursery() as nursery:
        nursery.start_soon(
            client.call,
            SERVICE,
            "Sleep",
            wrappers_pb2.DoubleValue(value=2),
            wrappers_pb2.DoubleValue,
        )
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(server.shutdown)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RpcError) as raised:
            await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
        assert raised.value.code is Code.UNAVAILABLE


async def test_serve_unix_over_a_real_socket(
    tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "husk.ttrpc")
    server, _ = probe_server()
    path = os.path.join(tmp_path, "ttrpc.sock")
    async with trio.open_nursery() as nursery:
        assert await nursery.start(server.serve_unix, path) == path
        stream = await trio.open_unix_socket(path)
        async with Client.open(stream) as client:
            replies = [
                await client.stub(PROBE).Echo(wrappers_pb2.StringValue(value=str(n)))
                for n in range(3)
            ]
        await server.shutdown()
    assert [reply.value for reply in replies] == ["0", "1", "2"]
    assert not os.path.exists(path)


async def test_socketpair_carries_calls() -> None:
    server, _ = probe_server()
    left, right = socket.socketpair()
    client_end = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    server_end = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        async with Client.open(client_end) as client:
            reply = await client.call(
                SERVICE, "Big", wrappers_pb2.Int64Value(value=3 << 20), wrappers_pb2.BytesValue
            )
    assert len(reply.value) == 3 << 20


async def test_error_in_the_client_block_propagates_unwrapped() -> None:
    client_end, _ = trio.testing.memory_stream_pair()
    with pytest.raises(KeyError):
        async with Client.open(client_end):
            raise KeyError("from the body")


async def test_outer_cancellation_passes_through_the_client_block() -> None:
    client_end, _ = trio.testing.memory_stream_pair()
    with trio.CancelScope() as scope:
        async with Client.open(client_end):
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_call_inside_an_outer_deadline_sends_the_remaining_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with trio.move_on_after(7):
            reply = await client.call(
                SERVICE, "Sleep", wrappers_pb2.DoubleValue(value=0), wrappers_pb2.DoubleValue
            )
    assert 6.9 < reply.value <= 7


async def test_call_in_an_already_cancelled_scope_is_cancelled_cleanly() -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
        assert scope.cancelled_caught
        reply = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="after"), wrappers_pb2.StringValue
        )
    assert reply.value == "after"
