"""husk's ttrpc against the Go ttrpc library, in both directions.

The Go side is ``ttrpcpeer`` built from Debian's golang-github-containerd-ttrpc-dev
(the library containerd and its shims link). Both sides serve ``husk.test.Echo``
(see ``echo_service``): our Client against their server, their client against
our Server, for unary calls with metadata, deadlines, status codes, payloads at
the 4 MiB frame limit and many concurrent calls on one connection.

Streaming is not covered here: Debian's ttrpc is 1.1.1, which has no streams
(``test_go_peer_sanity.test_peer_reports_its_feature_set`` fails the day it does,
so these tests get a streaming case then).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from google.protobuf import empty_pb2, wrappers_pb2

from agent_proto import ttrpc_pb2
from tests.conformance import echo_service, gopeer
from ttrpc import (
    MAX_MESSAGE_SIZE,
    Client,
    Code,
    DeadlineExceeded,
    MessageTooLarge,
    RpcError,
    Server,
)

pytestmark = pytest.mark.conformance

SERVICE = echo_service.SERVICE
ERROR_CODES = [c for c in Code if c is not Code.OK]


def largest_echo_payload() -> int:
    """The largest Echo payload whose request frame is exactly MAX_MESSAGE_SIZE long.

    Neither side sets a timeout or metadata on these calls, so the envelope is
    the same whoever encodes it.
    """

    def frame_length(n: int) -> int:
        payload = wrappers_pb2.BytesValue(value=b"\0" * n).SerializeToString()
        return ttrpc_pb2.Request(service=SERVICE, method="Echo", payload=payload).ByteSize()

    n = MAX_MESSAGE_SIZE - 64
    while frame_length(n + 1) <= MAX_MESSAGE_SIZE:
        n += 1
    assert frame_length(n) == MAX_MESSAGE_SIZE, "no payload size fills a frame exactly"
    return n


def pattern(n: int, seed: int) -> bytes:
    """The bytes the Go peer's ``large`` mode sends: byte(i*7) + seed."""
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


async def go_client(binary: Path, socket: Path | str, mode: str, *args: str) -> gopeer.ClientResult:
    """Run ``ttrpcpeer client`` without blocking the trio loop that serves it."""
    argv = gopeer.client_argv(binary, socket, mode, *args)
    with trio.fail_after(60):
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return gopeer.result_of(argv, proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------- fixtures


@dataclass
class HuskServer:
    socket: Path
    server: Server
    service: echo_service.EchoService


@pytest.fixture
async def husk_server(nursery: trio.Nursery, sock_dir: Path) -> AsyncIterator[HuskServer]:
    """husk's Server serving ``husk.test.Echo`` on a unix socket."""
    server = Server()
    service = echo_service.EchoService()
    assert server.register(echo_service.DESCRIPTOR, service) == [
        "Echo",
        "Metadata",
        "Sleep",
        "Fail",
    ]
    path = await nursery.start(server.serve_unix, sock_dir / "husk.sock")
    yield HuskServer(Path(path), server, service)
    with trio.fail_after(15):
        await server.shutdown(timeout=5)


@pytest.fixture
async def husk_client(go_server: gopeer.GoServer) -> AsyncIterator[Client]:
    """husk's Client connected to the Go server."""
    stream = await trio.open_unix_socket(str(go_server.socket))
    async with Client.open(stream) as client:
        yield client


# ---------------------------------------------------------------- husk client -> Go server


async def test_our_client_echo(husk_client: Client) -> None:
    data = bytes(range(256)) * 3
    resp = await husk_client.call(
        SERVICE, "Echo", wrappers_pb2.BytesValue(value=data), wrappers_pb2.BytesValue
    )
    assert resp.value == data


async def test_our_client_empty_message(husk_client: Client) -> None:
    resp = await husk_client.call(
        SERVICE, "Echo", wrappers_pb2.BytesValue(), wrappers_pb2.BytesValue
    )
    assert resp.value == b""


async def test_our_client_metadata(husk_client: Client) -> None:
    resp = await husk_client.call(
        SERVICE,
        "Metadata",
        empty_pb2.Empty(),
        wrappers_pb2.StringValue,
        metadata={"k": ["1", "2"], "containerd-namespace": "husk", "empty": ""},
    )
    assert json.loads(resp.value) == {
        "k": ["1", "2"],
        "containerd-namespace": ["husk"],
        "empty": [""],
    }


async def test_our_client_without_metadata(husk_client: Client) -> None:
    resp = await husk_client.call(SERVICE, "Metadata", empty_pb2.Empty(), wrappers_pb2.StringValue)
    assert json.loads(resp.value) == {}


async def test_our_client_deadline_expires(husk_client: Client) -> None:
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded) as info:
        await husk_client.call(
            SERVICE, "Sleep", wrappers_pb2.Int64Value(value=5000), wrappers_pb2.Int64Value,
            timeout=0.3,
        )  # fmt: skip
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert 0.25 <= trio.current_time() - start < 2
    # the connection is still good, and the late answer (if any) is not misdelivered
    resp = await husk_client.call(
        SERVICE, "Echo", wrappers_pb2.BytesValue(value=b"after"), wrappers_pb2.BytesValue
    )
    assert resp.value == b"after"


async def test_our_client_sends_its_deadline(husk_client: Client) -> None:
    resp = await husk_client.call(
        SERVICE, "Sleep", wrappers_pb2.Int64Value(value=10), wrappers_pb2.Int64Value, timeout=3
    )
    assert 2000 < resp.value <= 3000, "the Go server saw no (or a wrong) timeout_nano"


async def test_our_client_sends_an_enclosing_trio_deadline(husk_client: Client) -> None:
    with trio.move_on_after(3):
        resp = await husk_client.call(
            SERVICE, "Sleep", wrappers_pb2.Int64Value(value=10), wrappers_pb2.Int64Value
        )
    assert 2000 < resp.value <= 3000


async def test_our_client_no_deadline_is_none(husk_client: Client) -> None:
    resp = await husk_client.call(
        SERVICE, "Sleep", wrappers_pb2.Int64Value(value=1), wrappers_pb2.Int64Value
    )
    assert resp.value == -1


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
async def test_our_client_error_codes(husk_client: Client, code: Code) -> None:
    with pytest.raises(RpcError) as info:
        await husk_client.call(
            SERVICE, "Fail", wrappers_pb2.Int32Value(value=int(code)), empty_pb2.Empty
        )
    assert info.value.code is code
    assert info.value.message == f"fail with code {int(code)}"
    if code is Code.DEADLINE_EXCEEDED:
        assert isinstance(info.value, DeadlineExceeded)


async def test_our_client_unknown_method(husk_client: Client) -> None:
    with pytest.raises(RpcError) as info:
        await husk_client.call(SERVICE, "NoSuchMethod", empty_pb2.Empty(), empty_pb2.Empty)
    assert info.value.code is Code.UNIMPLEMENTED
    with pytest.raises(RpcError) as info:
        await husk_client.call("husk.test.Nobody", "Echo", empty_pb2.Empty(), empty_pb2.Empty)
    assert info.value.code is Code.UNIMPLEMENTED


async def test_our_client_payload_at_the_limit(husk_client: Client) -> None:
    n = largest_echo_payload()
    data = pattern(n, 5)
    # no timeout: timeout_nano would make the frame longer than the limit
    resp = await husk_client.call(
        SERVICE, "Echo", wrappers_pb2.BytesValue(value=data), wrappers_pb2.BytesValue
    )
    assert resp.value == data


async def test_our_client_refuses_a_payload_over_the_limit(husk_client: Client) -> None:
    n = largest_echo_payload() + 1
    with pytest.raises(MessageTooLarge) as info:
        await husk_client.call(
            SERVICE, "Echo", wrappers_pb2.BytesValue(value=b"\0" * n), wrappers_pb2.BytesValue
        )
    assert info.value.code is Code.RESOURCE_EXHAUSTED
    resp = await husk_client.call(
        SERVICE, "Echo", wrappers_pb2.BytesValue(value=b"ok"), wrappers_pb2.BytesValue
    )
    assert resp.value == b"ok"


async def test_our_client_concurrent_calls(husk_client: Client) -> None:
    callers, calls = 32, 50
    results: dict[tuple[int, int], bytes] = {}

    async def caller(g: int) -> None:
        for i in range(calls):
            want = f"caller {g} call {i} ".encode() + b"x" * ((g * 31 + i) % 500)
            resp = await husk_client.call(
                SERVICE, "Echo", wrappers_pb2.BytesValue(value=want), wrappers_pb2.BytesValue
            )
            assert resp.value == want
            results[g, i] = resp.value

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for g in range(callers):
                nursery.start_soon(caller, g)
    assert len(results) == callers * calls


async def test_our_client_calls_are_multiplexed(husk_client: Client) -> None:
    """16 calls of 100-700 ms on one connection finish together: replies come out of order."""
    order: list[int] = []

    async def sleeper(ms: int) -> None:
        await husk_client.call(
            SERVICE, "Sleep", wrappers_pb2.Int64Value(value=ms), wrappers_pb2.Int64Value
        )
        order.append(ms)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for k in range(16):
            nursery.start_soon(sleeper, 700 - k * 40)  # the last sent answers first
    assert trio.current_time() - start < 1.5
    assert order == sorted(order)


# ---------------------------------------------------------------- Go client -> husk server


async def test_their_client_echo(go_peer: Path, husk_server: HuskServer) -> None:
    r = await go_client(go_peer, husk_server.socket, "echo", "-data", "ünïcode from go")
    assert r.returncode == 0, r.describe()
    assert r.line["data"] == "ünïcode from go"
    assert husk_server.service.calls == 1


async def test_their_client_metadata(go_peer: Path, husk_server: HuskServer) -> None:
    r = await go_client(
        go_peer, husk_server.socket, "metadata", "-md", "k=1", "-md", "k=2", "-md", "x=y"
    )
    assert r.returncode == 0, r.describe()
    assert r.line["metadata"] == {"k": ["1", "2"], "x": ["y"]}


async def test_their_client_deadline(go_peer: Path, husk_server: HuskServer) -> None:
    r = await go_client(
        go_peer, husk_server.socket, "deadline", "-timeout-ms", "200", "-sleep-ms", "5000"
    )
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == Code.DEADLINE_EXCEEDED


async def test_our_server_enforces_the_deadline_it_was_sent(
    go_peer: Path, husk_server: HuskServer
) -> None:
    """The Go client sends timeout_nano but does not time out itself: only we can."""
    r = await go_client(
        go_peer,
        husk_server.socket,
        "deadline",
        "-server-only",
        "-timeout-ms",
        "300",
        "-sleep-ms",
        "5000",
    )
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == Code.DEADLINE_EXCEEDED
    assert "local" not in r.line["error"], "the status must come from our server"
    assert 250 <= r.line["elapsed_ms"] < 2000


async def test_our_server_reads_their_deadline(go_peer: Path, husk_server: HuskServer) -> None:
    r = await go_client(
        go_peer, husk_server.socket, "deadline", "-timeout-ms", "3000", "-sleep-ms", "10"
    )
    assert r.returncode == 0, r.describe()
    assert 2000 < r.line["deadline_seen_ms"] <= 3000


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
async def test_their_client_error_codes(go_peer: Path, husk_server: HuskServer, code: Code) -> None:
    r = await go_client(go_peer, husk_server.socket, "error", "-code", str(int(code)))
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == code
    assert r.line["error"]["message"] == f"fail with code {int(code)}"


async def test_their_client_unknown_method(go_peer: Path, husk_server: HuskServer) -> None:
    r = await go_client(go_peer, husk_server.socket, "unknown")
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == Code.UNIMPLEMENTED


async def test_their_client_payload_at_the_limit(go_peer: Path, husk_server: HuskServer) -> None:
    n = largest_echo_payload()
    r = await go_client(go_peer, husk_server.socket, "large", "-size", str(n))
    assert r.returncode == 0, r.describe()
    assert r.line["received"] == n


async def test_our_server_answers_an_oversize_frame(go_peer: Path, husk_server: HuskServer) -> None:
    """Go does not check sizes when sending; we must skip the frame and answer, like Go does."""
    n = largest_echo_payload() + 1
    r = await go_client(go_peer, husk_server.socket, "large", "-size", str(n))
    assert r.returncode == 1, r.describe()
    assert r.line["error"]["code"] == Code.RESOURCE_EXHAUSTED
    again = await go_client(go_peer, husk_server.socket, "echo")
    assert again.returncode == 0, again.describe()


async def test_their_client_concurrent_calls(go_peer: Path, husk_server: HuskServer) -> None:
    r = await go_client(go_peer, husk_server.socket, "concurrent", "-callers", "32", "-calls", "50")
    assert r.returncode == 0, r.describe()
    assert r.line["good"] == 32 * 50
    assert husk_server.service.calls == 32 * 50


async def test_their_clients_on_many_connections(go_peer: Path, husk_server: HuskServer) -> None:
    results: list[gopeer.ClientResult] = []

    async def one() -> None:
        results.append(
            await go_client(
                go_peer, husk_server.socket, "concurrent", "-callers", "16", "-calls", "20"
            )
        )

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    assert [r.returncode for r in results] == [0] * 6, [r.describe() for r in results]
    assert husk_server.service.calls == 6 * 16 * 20


async def test_our_server_deadline_is_on_trio_clock(husk_server: HuskServer) -> None:
    """Our own client against our own server agrees with the Go peers on deadlines."""
    stream = await trio.open_unix_socket(str(husk_server.socket))
    # assertions stay outside `async with Client.open`, which can swallow what leaves it
    async with Client.open(stream) as client:
        with_deadline = await client.call(
            SERVICE, "Sleep", wrappers_pb2.Int64Value(value=1), wrappers_pb2.Int64Value, timeout=3
        )
        without = await client.call(
            SERVICE, "Sleep", wrappers_pb2.Int64Value(value=1), wrappers_pb2.Int64Value
        )
    assert 2000 < with_deadline.value <= 3000
    assert without.value == -1
