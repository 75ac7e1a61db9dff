"""Byte streams from the shim to the guest agent.

Three channels carry the same ttrpc protocol:

- **vsock** (AF_VSOCK): the guest's CID and the agent's port (1024), through
  the host's vhost-vsock.
- **hybrid vsock**: a unix socket exposed by Cloud Hypervisor, Firecracker or the
  built-in VMM; the host writes ``CONNECT <port>\\n`` and the VMM answers
  ``OK <host-port>\\n`` before the stream carries the guest's bytes.
- **virtio-serial**: QEMU's unix-socket chardev bound to the guest's
  ``agent.channel.0`` port, for hosts without ``/dev/vhost-vsock``.

``connect`` retries while the far end is not there yet (the VM is still
booting) and fails with ``AgentUnreachableError`` naming the endpoint once the
timeout passes.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from shim.errors import HuskError
from shim.hypervisor import AgentEndpoint, HybridVsockEndpoint, SerialEndpoint, VsockEndpoint
from ttrpc.codes import Code

#: errors that mean "not there yet": worth another try until the deadline
_RETRYABLE = {
    errno.ENOENT,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
    errno.ENODEV,
    errno.EHOSTUNREACH,
    errno.EAGAIN,
}
_RETRY_INTERVAL = 0.05
_HANDSHAKE_LIMIT = 64


class AgentUnreachableError(HuskError):
    """The agent's endpoint did not accept a connection in time."""

    code = Code.UNAVAILABLE


class HandshakeError(AgentUnreachableError):
    """A hybrid-vsock VMM refused or garbled the ``CONNECT`` handshake."""


def describe(endpoint: AgentEndpoint) -> str:
    """The endpoint in words, for error messages."""
    match endpoint:
        case VsockEndpoint(cid, port):
            return f"vsock cid {cid} port {port}"
        case HybridVsockEndpoint(path, port):
            return f"hybrid vsock {path} port {port}"
        case SerialEndpoint(path):
            return f"virtio-serial {path}"


def endpoint_record(endpoint: AgentEndpoint | None) -> dict[str, Any]:
    """An endpoint as plain JSON values, for the sandbox's record (``{}`` for None)."""
    match endpoint:
        case VsockEndpoint(cid, port):
            return {"kind": "vsock", "cid": cid, "port": port}
        case HybridVsockEndpoint(path, port):
            return {"kind": "hybrid-vsock", "path": str(path), "port": port}
        case SerialEndpoint(path):
            return {"kind": "serial", "path": str(path)}
    return {}


def endpoint_from_record(record: Mapping[str, Any]) -> AgentEndpoint | None:
    """The endpoint ``endpoint_record`` wrote (None for ``{}`` or an unknown kind)."""
    try:
        match record.get("kind"):
            case "vsock":
                return VsockEndpoint(int(record["cid"]), int(record["port"]))
            case "hybrid-vsock":
                return HybridVsockEndpoint(Path(record["path"]), int(record["port"]))
            case "serial":
                return SerialEndpoint(Path(record["path"]))
    except (KeyError, TypeError, ValueError):
        pass
    return None


async def connect(endpoint: AgentEndpoint, timeout: float) -> trio.abc.Stream:
    """Open a stream to the agent, retrying until ``timeout`` seconds pass."""
    match endpoint:
        case VsockEndpoint(cid, port):
            dial: Callable[[], Awaitable[trio.abc.Stream]] = lambda: _vsock(cid, port)  # noqa: E731
        case HybridVsockEndpoint(path, port):
            dial = lambda: _hybrid_vsock(str(path), port)  # noqa: E731
        case SerialEndpoint(path):
            dial = lambda: _unix(str(path))  # noqa: E731
    return await _retry(dial, timeout, describe(endpoint))


async def _retry(
    dial: Callable[[], Awaitable[trio.abc.Stream]], timeout: float, what: str
) -> trio.abc.Stream:
    last: OSError | None = None
    with trio.move_on_after(timeout):
        while True:
            try:
                return await dial()
            except HandshakeError:
                raise
            except OSError as e:
                if e.errno not in _RETRYABLE:
                    raise AgentUnreachableError(
                        f"cannot connect to the agent at {what}: {e.strerror or e}"
                    ) from None
                last = e
            await trio.sleep(_RETRY_INTERVAL)
    reason = f": {last.strerror or last}" if last is not None else ""
    raise AgentUnreachableError(
        f"agent at {what} did not accept a connection within {timeout:g} s{reason}"
    )


async def _unix(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def _vsock(cid: int, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        await sock.connect((cid, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _hybrid_vsock(path: str, port: int) -> trio.abc.Stream:
    stream = await trio.open_unix_socket(path)
    try:
        await stream.send_all(f"CONNECT {port}\n".encode())
        line, rest = await _read_line(stream, path)
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            shown = line.decode(errors="replace")
            raise HandshakeError(
                f"hybrid vsock {path} port {port}: VMM answered {shown!r} to CONNECT, "
                "expected 'OK <port>'"
            )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return PrefixedStream(stream, rest) if rest else stream


async def _read_line(stream: trio.abc.Stream, path: str) -> tuple[bytes, bytes]:
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > _HANDSHAKE_LIMIT:
            raise HandshakeError(f"hybrid vsock {path}: handshake reply too long")
        chunk = await stream.receive_some(_HANDSHAKE_LIMIT)
        if not chunk:
            # the VMM closes at once while the guest's port has no listener yet
            raise OSError(errno.ECONNRESET, "VMM closed the connection during CONNECT")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    return line, rest


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes already read past a handshake."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self._inner, trio.abc.HalfCloseableStream):
            await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()
