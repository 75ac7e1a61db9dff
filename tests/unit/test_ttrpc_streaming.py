"""Streaming calls (ttrpc 1.2): data frames and the remote-open/closed flags."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from google.protobuf import wrappers_pb2

from tests.unit.test_ttrpc_support import PROBE, SERVICE, connected, probe_server, raw_connection
from ttrpc import Code, DeadlineExceeded, RpcError
from ttrpc.frame import Flags, MessageType


def _words(values: list[wrappers_pb2.StringValue]) -> list[str]:
    return [value.value for value in values]


async def test_server_streaming_delivers_every_message_then_ends() -> None:
    server, _ = probe_server()
    async with (
        connected(server) as client,
        client.open_stream(
            SERVICE,
            "Split",
            wrappers_pb2.StringValue,
            client_streaming=False,
            server_streaming=True,
            request=wrappers_pb2.StringValue(value="a b c"),
        ) as stream,
    ):
        received = [message async for message in stream]
    assert _words(received) == ["a", "b", "c"]


async def test_client_streaming_sends_messages_and_gets_one_response() -> None:
    server, _ = probe_server()
    async with connected(server) as client, client.stub(PROBE).Join() as stream:
        for word in ("x", "y", "z"):
            await stream.send(wrappers_pb2.StringValue(value=word))
        await stream.close_send()
        reply = await stream.recv()
        with pytest.raises(trio.EndOfChannel):
            await stream.recv()
    assert reply.value == "x y z"


async def test_bidirectional_stream_interleaves_both_ways() -> None:
    server, _ = probe_server()
    async with connected(server) as client, client.stub(PROBE).Chat() as stream:
        replies = []
        for word in ("ping", "pong"):
            await stream.send(wrappers_pb2.StringValue(value=word))
            replies.append((await stream.recv()).value)
        await stream.close_send()
        rest = [message async for message in stream]
    assert (replies, rest) == (["PING", "PONG"], [])


async def test_streaming_handler_error_reaches_the_client_with_its_code() -> None:
    server, _ = probe_server()
    request = wrappers_pb2.StringValue(value="fail")
    async with connected(server) as client, client.stub(PROBE).Split(request) as stream:
        with pytest.raises(RpcError) as raised:
            await stream.recv()
    assert (raised.value.code, raised.value.message) == (Code.NOT_FOUND, "nothing to split")


async def test_stream_past_its_timeout_raises_deadline_exceeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, _ = probe_server()
    async with connected(server) as client:
        with pytest.raises(DeadlineExceeded):
            async with client.stub(PROBE).Join(timeout=3) as stream:
                await stream.recv()
        assert trio.current_time() == pytest.approx(3)


async def test_server_streaming_wire_frames_match_containerd() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        from agent_proto import ttrpc_pb2

        request = ttrpc_pb2.Request(
            service=SERVICE,
            method="Split",
            payload=wrappers_pb2.StringValue(value="one two").SerializeToString(),
        )
        await peer.send_frame(
            1, MessageType.REQUEST, Flags.REMOTE_CLOSED, request.SerializeToString()
        )
        frames = [await peer.receive() for _ in range(3)]
    assert [(f.message_type, f.flags) for f in frames if f] == [
        (MessageType.DATA, 0),
        (MessageType.DATA, 0),
        (MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA),
    ]


async def test_client_streaming_wire_frames_match_containerd() -> None:
    server, _ = probe_server()
    async with raw_connection(server) as peer:
        from agent_proto import ttrpc_pb2

        request = ttrpc_pb2.Request(service=SERVICE, method="Join")
        await peer.send_frame(
            1, MessageType.REQUEST, Flags.REMOTE_OPEN, request.SerializeToString()
        )
        for word in ("left", "right"):
            await peer.send_frame(
                1, MessageType.DATA, 0, wrappers_pb2.StringValue(value=word).SerializeToString()
            )
        await peer.send_frame(1, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")
        stream_id, response = await peer.response()
    assert (stream_id, response.status.code) == (1, Code.OK)
    assert wrappers_pb2.StringValue.FromString(response.payload).value == "left right"


async def test_streams_and_unary_calls_share_one_connection() -> None:
    server, _ = probe_server()
    async with connected(server) as client, client.stub(PROBE).Chat() as chat:
        await chat.send(wrappers_pb2.StringValue(value="a"))
        echo = await client.call(
            SERVICE, "Echo", wrappers_pb2.StringValue(value="u"), wrappers_pb2.StringValue
        )
        assert (await chat.recv()).value == "A"
        await chat.close_send()
    assert echo.value == "u"
