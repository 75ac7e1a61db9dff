"""Host sessions on the virtio-serial port: a new client is told apart by its stream ids."""

from __future__ import annotations

import os
import tty
from pathlib import Path

import trio
import trio.testing

from agent_proto import health_pb2
from guest.agent import build_server
from guest.agent.channel import serve_serial
from guest.agent.host_sessions import HostSession, HostSessions
from tests.unit.test_agent_service import make_service
from ttrpc import MessageType
from ttrpc.client import Client
from ttrpc.frame import encode_header

DATA = 3


def frame(stream_id: int, message_type: int = MessageType.REQUEST, payload: bytes = b"x") -> bytes:
    return encode_header(len(payload), stream_id, message_type) + payload


async def read_to_eof(session: HostSession, max_bytes: int | None = None) -> bytes:
    out = b""
    while chunk := await session.receive_some(max_bytes):
        out += chunk
    return out


async def test_a_request_id_that_does_not_increase_starts_a_new_session() -> None:
    host, guest = trio.testing.memory_stream_pair()
    sessions = HostSessions(guest)
    first_client = frame(1) + frame(3, payload=b"hello") + frame(3, DATA, b"more") + frame(5)
    second_client = frame(1, payload=b"again") + frame(3)
    await host.send_all(first_client + second_client)
    await host.send_eof()

    first = sessions.next()
    assert await read_to_eof(first) == first_client
    assert sessions.host_reconnected and not sessions.ended
    second = sessions.next()
    assert await read_to_eof(second) == second_client
    assert sessions.ended and not sessions.host_reconnected
    assert await first.receive_some() == b""  # an ended session stays ended


async def test_frames_cut_anywhere_and_small_reads_keep_the_boundaries() -> None:
    host, guest = trio.testing.memory_stream_pair()
    sessions = HostSessions(guest)
    first_client, second_client = frame(1, payload=b"a" * 40) + frame(7), frame(1)
    wire = first_client + second_client

    async def trickle() -> None:
        for i in range(0, len(wire), 3):  # headers and payloads split across reads
            await host.send_all(wire[i : i + 3])
            await trio.sleep(0)
        await host.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        assert await read_to_eof(sessions.next(), max_bytes=4) == first_client
        assert sessions.host_reconnected
        assert await read_to_eof(sessions.next(), max_bytes=4) == second_client


async def test_an_ended_session_cannot_write_into_the_next() -> None:
    host, guest = trio.testing.memory_stream_pair()
    sessions = HostSessions(guest)
    await host.send_all(frame(1) + frame(1))
    first = sessions.next()
    assert await first.receive_some() == frame(1)
    assert await first.receive_some() == b""
    second = sessions.next()
    assert await second.receive_some() == frame(1)
    await second.send_all(b"answer")
    assert await host.receive_some() == b"answer"
    try:
        await first.send_all(b"stale")
    except trio.ClosedResourceError:
        pass
    else:
        raise AssertionError("the ended session could still write")
    await second.aclose()
    await host.send_all(b"still open")  # closing a session leaves the port open
    assert await guest.receive_some() == b"still open"


async def test_a_second_client_without_a_hangup_between_is_served(tmp_path: Path) -> None:
    """Two host clients in a row on a raw pty; the agent never reads EOF between them,
    as when the guest handles 'host closed' and 'host opened' together."""
    server = build_server(make_service(tmp_path))
    master, slave = os.openpty()
    tty.setraw(slave)
    path = Path(os.ttyname(slave))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_serial, server, path)
            os.close(slave)
            for _ in range(3):
                # each client closes its own dup; the master stays open: no hangup
                async with Client.open(trio.lowlevel.FdStream(os.dup(master))) as client:
                    health = client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"])
                    with trio.fail_after(5):
                        check = await health.Check(health_pb2.CheckRequest())
                    assert check.status == health_pb2.HealthCheckResponse.SERVING
            nursery.cancel_scope.cancel()
    finally:
        os.close(master)
