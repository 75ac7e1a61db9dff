"""Hostile or broken input: each is answered or closes that connection alone."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from google.protobuf import wrappers_pb2

from agent_proto import ttrpc_pb2
from tests.unit.test_ttrpc_support import SERVICE, connected, probe_server, raw_connection
from ttrpc import Client, Code, Server
from ttrpc.frame import MAX_MESSAGE_SIZE, MessageType, encode_header


@pytest.fixture
def ttrpc_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, "husk.ttrpc")
    return caplog


def _echo(value: str) -> bytes:
    return wrappers_pb2.StringValue(value=value).SerializeToString()


async def _assert_serves(server: Server) -> None:
    async with connected(server) as client:
        reply = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="still"), wrappers_pb2.StringValue
        )
    assert reply.value == "still"


async def test_oversize_frame_is_skipped_and_answered_resource_exhausted(
    ttrpc_log: pytest.LogCaptureFixture,
) -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        length = MAX_MESSAGE_SIZE + 1
        await peer.stream.send_all(
            encode_header(length, 1, MessageType.REQUEST, 0) + b"\0" * length
        )
        stream_id, response = await peer.response()
        assert (stream_id, response.status.code) == (1, Code.RESOURCE_EXHAUSTED)
        await peer.send_request(3, "Echo", _echo("after"))
        stream_id, response = await peer.response()
        assert (stream_id, response.status.code) == (3, Code.OK)
        assert wrappers_pb2.StringValue.FromString(response.payload).value == "after"
    assert "exceeds the maximum" in ttrpc_log.text


async def test_truncated_header_closes_the_connection_with_a_logged_reason(
    ttrpc_log: pytest.LogCaptureFixture,
) -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.stream.send_all(encode_header(5, 1, MessageType.REQUEST, 0)[:4])
        await peer.stream.send_stream.aclose()  # type: ignore[attr-defined]
        assert await peer.receive() is None
    assert "stream ended inside a frame" in ttrpc_log.text
    await _assert_serves(server)


async def test_garbage_request_protobuf_is_invalid_argument() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.send_frame(1, MessageType.REQUEST, 0, b"\xff\xff\xff\xff")
        stream_id, response = await peer.response()
    assert (stream_id, response.status.code) == (1, Code.INVALID_ARGUMENT)


async def test_garbage_call_payload_is_invalid_argument() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.send_request(1, "Echo", b"\x0a\xff")
        _, response = await peer.response()
    assert response.status.code == Code.INVALID_ARGUMENT
    assert "google.protobuf.StringValue" in response.status.message


async def test_unknown_message_type_is_ignored_and_logged(
    ttrpc_log: pytest.LogCaptureFixture,
) -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.send_frame(1, 0x7F, 0, b"future")
        await peer.send_request(3, "Echo", _echo("next"))
        stream_id, response = await peer.response()
    assert (stream_id, response.status.code) == (3, Code.OK)
    assert "ignoring message type 127" in ttrpc_log.text


async def test_data_for_unknown_stream_is_invalid_argument() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.send_frame(41, MessageType.DATA, 0, b"")
        stream_id, response = await peer.response()
    assert (stream_id, response.status.code) == (41, Code.INVALID_ARGUMENT)


async def test_request_on_even_stream_id_is_invalid_argument() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.send_request(2, "Echo", _echo("x"))
        stream_id, response = await peer.response()
    assert (stream_id, response.status.code) == (2, Code.INVALID_ARGUMENT)
    assert "odd" in response.status.message


async def test_reused_stream_id_is_invalid_argument() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        await peer.send_request(5, "Echo", _echo("x"))
        await peer.response()
        await peer.send_request(5, "Echo", _echo("x"))
        stream_id, response = await peer.response()
    assert (stream_id, response.status.code) == (5, Code.INVALID_ARGUMENT)


async def test_server_deadline_from_timeout_nano_without_client_help(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, service = probe_server()
    async with raw_connection(server) as peer:
        payload = wrappers_pb2.DoubleValue(value=60).SerializeToString()
        await peer.send_request(1, "Sleep", payload, timeout_nano=2_000_000_000)
        _, response = await peer.response()
        assert response.status.code == Code.DEADLINE_EXCEEDED
        assert trio.current_time() == pytest.approx(2)
    assert service.finished == 0


async def test_hostile_connection_does_not_disturb_another() -> None:
    server, _ = probe_server()
    async with connected(server) as good, raw_connection(server) as bad:
        await bad.stream.send_all(b"\x00\x00\x00\x01garbage-that-is-not-a-frame")
        reply = await good.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="ok"), wrappers_pb2.StringValue
        )
        assert reply.value == "ok"


async def test_client_ignores_response_for_unknown_stream(
    ttrpc_log: pytest.LogCaptureFixture,
) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with Client.open(client_end) as client, trio.open_nursery() as nursery:

        async def fake_server() -> None:
            ok = ttrpc_pb2.Response(payload=_echo("real")).SerializeToString()
            stray = ttrpc_pb2.Response().SerializeToString()
            await server_end.send_all(
                encode_header(len(stray), 99, MessageType.RESPONSE, 0) + stray
            )
            await server_end.send_all(encode_header(len(ok), 1, MessageType.RESPONSE, 0) + ok)

        nursery.start_soon(fake_server)
        reply = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue
        )
    assert reply.value == "real"
    assert "unknown stream 99" in ttrpc_log.text


async def test_client_fails_pending_calls_on_a_truncated_frame() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with Client.open(client_end) as client, trio.open_nursery() as nursery:

        async def broken_server() -> None:
            await server_end.send_all(encode_header(100, 1, MessageType.RESPONSE, 0) + b"short")
            await server_end.aclose()

        nursery.start_soon(broken_server)
        with pytest.raises(Exception) as raised:
            await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(), wrappers_pb2.StringValue)
    assert raised.value.code is Code.UNAVAILABLE  # type: ignore[attr-defined]
    assert "protocol error" in str(raised.value)
