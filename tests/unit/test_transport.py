"""Agent transports at the socket level: virtio-serial, hybrid vsock, vsock."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from common import channel_auth
from shim.agent import transport
from shim.hypervisor import HybridVsockEndpoint, SerialEndpoint, VsockEndpoint

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def unix_server(path: Path, handler: Handler, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])


async def echo(stream: trio.SocketStream) -> None:
    async for chunk in stream:
        await stream.send_all(chunk)


async def test_serial_connects_to_the_chardev_socket(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    async with trio.open_nursery() as nursery:
        await unix_server(path, echo, nursery)
        stream = await transport.connect(SerialEndpoint(path), timeout=2)
        await stream.send_all(b"ping")
        assert await stream.receive_some(4) == b"ping"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_serial_waits_for_the_socket_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    async with trio.open_nursery() as nursery:

        async def late_server() -> None:
            await trio.sleep(0.2)
            await unix_server(path, echo, nursery)

        nursery.start_soon(late_server)
        stream = await transport.connect(SerialEndpoint(path), timeout=5)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_serial_timeout_names_the_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(transport.AgentUnreachableError) as err:
        await transport.connect(SerialEndpoint(path), timeout=0.2)
    assert str(err.value) == (
        f"agent at virtio-serial {path} did not accept a connection within 0.2 s: "
        "No such file or directory"
    )


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.secret"
    channel_auth.write_secret(path)
    return path


def hybrid_vmm(reply: bytes, seen: list[bytes], secret: Path | None = None) -> Handler:
    """A VMM's hybrid vsock socket, and behind it a guest that challenges for ``secret``."""

    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\n" not in buf:
            buf += await stream.receive_some(64)
        seen.append(buf)
        if reply:
            await stream.send_all(reply)
            if secret is not None:
                key = channel_auth.read_secret(secret)
                if not await channel_auth.admit(stream, key, channel_auth.AGENT):
                    await stream.aclose()  # refused: closed without a word
                    return
            await echo(stream)
        await stream.aclose()

    return handler


async def test_hybrid_vsock_sends_connect_and_keeps_bytes_after_ok(tmp_path: Path) -> None:
    path, seen = tmp_path / "hvsock", list[bytes]()
    async with trio.open_nursery() as nursery:
        secret = secret_file(tmp_path)
        await unix_server(path, hybrid_vmm(b"OK 1073741824\n", seen, secret), nursery)
        stream = await transport.connect(HybridVsockEndpoint(path, 1024, secret), timeout=2)
        await stream.send_all(b"after")
        assert await stream.receive_some(100) == b"after"
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == [b"CONNECT 1024\n"]


async def test_hybrid_vsock_refusal_is_a_handshake_error(tmp_path: Path) -> None:
    path = tmp_path / "hvsock"
    async with trio.open_nursery() as nursery:
        await unix_server(path, hybrid_vmm(b"ERR no listener\n", []), nursery)
        with pytest.raises(transport.HandshakeError, match=r"answered 'ERR no listener'"):
            await transport.connect(HybridVsockEndpoint(path, 1024, secret_file(tmp_path)), 2)
        nursery.cancel_scope.cancel()


async def test_hybrid_vsock_retries_while_the_vmm_hangs_up(tmp_path: Path) -> None:
    path, seen = tmp_path / "hvsock", list[bytes]()
    async with trio.open_nursery() as nursery:
        await unix_server(path, hybrid_vmm(b"", seen), nursery)
        with pytest.raises(transport.AgentUnreachableError, match=r"within 0.3 s"):
            await transport.connect(HybridVsockEndpoint(path, 1024, secret_file(tmp_path)), 0.3)
        nursery.cancel_scope.cancel()
    assert len(seen) > 1


async def test_vsock_to_an_absent_guest_fails_naming_cid_and_port(tmp_path: Path) -> None:
    with pytest.raises(transport.AgentUnreachableError, match=r"vsock cid 4242 port 1024"):
        await transport.connect(VsockEndpoint(4242, 1024, secret_file(tmp_path)), timeout=0.3)


async def test_vsock_opens_an_af_vsock_socket_to_the_cid_and_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[int, object]] = []
    real_socket = trio.socket.socket

    def spy(family: int, kind: int) -> trio.socket.SocketType:
        sock = real_socket(family, kind)
        seen.append((family, kind))
        return sock

    monkeypatch.setattr(trio.socket, "socket", spy)
    with pytest.raises(transport.AgentUnreachableError):
        await transport.connect(VsockEndpoint(7, 1024, secret_file(tmp_path)), timeout=0.1)
    assert seen and seen[0] == (socket.AF_VSOCK, socket.SOCK_STREAM)


def test_a_record_names_the_secret_file_never_its_bytes(tmp_path: Path) -> None:
    secret = secret_file(tmp_path)
    endpoint = VsockEndpoint(7, 1026, secret)
    record = transport.endpoint_record(endpoint)
    assert record == {"kind": "vsock", "cid": 7, "port": 1026, "secret_file": str(secret)}
    assert channel_auth.read_secret(secret).hex() not in repr(record)
    assert transport.endpoint_from_record(record) == endpoint
    hybrid = HybridVsockEndpoint(tmp_path / "h.sock", 1024, secret)
    assert transport.endpoint_from_record(transport.endpoint_record(hybrid)) == hybrid


async def test_a_vsock_endpoint_without_a_readable_secret_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(transport.HandshakeError, match="names no secret file"):
        await transport.connect(VsockEndpoint(7, 1024), timeout=5)
    with pytest.raises(transport.HandshakeError, match="cannot read the channel secret"):
        await transport.connect(VsockEndpoint(7, 1024, tmp_path / "gone"), timeout=5)


async def test_a_guest_that_refuses_the_secret_fails_at_once_naming_the_endpoint(
    tmp_path: Path,
) -> None:
    path, secret = tmp_path / "hvsock", secret_file(tmp_path)
    other = tmp_path / "other"
    channel_auth.write_secret(other)
    async with trio.open_nursery() as nursery:
        await unix_server(path, hybrid_vmm(b"OK 1\n", [], other), nursery)
        with pytest.raises(transport.HandshakeError, match=r"hybrid vsock .* refused this sandbox"):
            await transport.connect(HybridVsockEndpoint(path, 1024, secret), timeout=5)
        nursery.cancel_scope.cancel()


async def test_a_guest_without_the_handshake_is_named_an_old_image(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "hvsock"
    async with trio.open_nursery() as nursery:
        await unix_server(path, hybrid_vmm(b"OK 1\n", []), nursery)  # then echo: no challenge
        with pytest.raises(transport.HandshakeError, match="older than this shim"):
            await transport.connect(HybridVsockEndpoint(path, 1024, secret_file(tmp_path)), 60)
        nursery.cancel_scope.cancel()
