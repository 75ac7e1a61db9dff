"""Fuzz: arbitrary frames and garbage never escape a server connection.

For every input the server must (1) finish that connection without raising,
(2) write only well-formed frames back, and (3) still serve a second,
well-behaved connection afterwards.
"""

from __future__ import annotations

import trio
import trio.testing
from google.protobuf import wrappers_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_proto import ttrpc_pb2
from tests.unit.test_ttrpc_support import SERVICE, probe_server
from ttrpc import Client
from ttrpc.frame import FrameReader, MessageType, encode_header

_METHODS = ["Echo", "Meta", "Sleep", "Fail", "Big", "Split", "Join", "Chat", "Nope"]

_payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda method, payload, timeout: ttrpc_pb2.Request(
            service=SERVICE, method=method, payload=payload, timeout_nano=timeout
        ).SerializeToString(),
        st.sampled_from(_METHODS),
        st.one_of(
            st.binary(max_size=16),
            st.sampled_from(
                [
                    wrappers_pb2.DoubleValue(value=0.5).SerializeToString(),
                    wrappers_pb2.StringValue(value="a b").SerializeToString(),
                    wrappers_pb2.Int64Value(value=10).SerializeToString(),
                ]
            ),
        ),
        st.sampled_from([0, -1, 1, 10**9]),
    ),
)

_frames = st.builds(
    lambda stream_id, message_type, flags, payload, lie: (
        encode_header(max(0, len(payload) + lie), stream_id, message_type, flags) + payload
    ),
    st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    st.one_of(st.sampled_from([1, 2, 3]), st.integers(0, 255)),
    st.integers(0, 255),
    _payloads,
    st.sampled_from([0, 0, 0, 1, -1, 2**31]),  # how far the length field lies
)

_inputs = st.tuples(st.lists(_frames, max_size=8), st.binary(max_size=32))


async def _drain_answers(stream: trio.abc.ReceiveStream) -> int:
    reader = FrameReader(stream)
    count = 0
    while (frame := await reader.receive()) is not None:
        assert frame.message_type in (MessageType.RESPONSE, MessageType.DATA)
        if frame.message_type == MessageType.RESPONSE:
            ttrpc_pb2.Response.FromString(frame.payload)
        count += 1
    return count


async def _scenario(frames: list[bytes], tail: bytes) -> int:
    server, _ = probe_server(shutdown_timeout=1)
    hostile, server_end = trio.testing.memory_stream_pair()
    answers: list[int] = []

    async def drain() -> None:
        answers.append(await _drain_answers(hostile))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        nursery.start_soon(drain)
        await hostile.send_all(b"".join(frames) + tail)
        await trio.sleep(5)
        await hostile.send_stream.aclose()
    assert server.connection_count == 0

    good, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        async with Client.open(good) as client:
            reply = await client.call(
                SERVICE, "Echo", wrappers_pb2.StringValue(value="ok"), wrappers_pb2.StringValue
            )
    assert reply.value == "ok"
    return answers[0]


def test_harness_sees_the_answers_of_well_formed_requests() -> None:
    request = ttrpc_pb2.Request(service=SERVICE, method="Echo").SerializeToString()
    frames = [encode_header(len(request), n, MessageType.REQUEST, 0) + request for n in (1, 3)]
    clock = trio.testing.MockClock(autojump_threshold=0)
    assert trio.run(_scenario, frames, b"", clock=clock) == 2


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(_inputs)
def test_arbitrary_frames_never_escape_the_server(data: tuple[list[bytes], bytes]) -> None:
    frames, tail = data
    trio.run(_scenario, frames, tail, clock=trio.testing.MockClock(autojump_threshold=0))
