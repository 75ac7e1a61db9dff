"""Byte streams from the shim to the guest agent.

Three channels carry the same ttrpc protocol:

- **vsock** (AF_VSOCK): the guest's CID and the agent's port (1024), through
  the host's vhost-vsock.
- **hybrid vsock**: a unix socket exposed by Cloud Hypervisor, Firecracker or the
  built-in VMM; the host writes ``CONNECT <port>\\n`` and the VMM answers
  ``OK <host-port>\\n`` before the stream carries the guest's bytes.
- **virtio-serial**: QEMU's unix-socket chardev bound to the guest's
  ``agent.channel.0`` port, for hosts without ``/dev/vhost-vsock``.

On vsock and hybrid vsock, which any host process can reach, the guest
serves a connection only after the shim proves the sandbox's secret
(:mod:`common.channel_auth`; the endpoint names the 0600 file that holds it):
``connect`` answers the guest's challenge before it returns the stream.
virtio-serial has no handshake: its socket is QEMU's, in a root-only dir.

``connect`` retries while the far end is not there yet (the VM is still
booting) and fails with ``AgentUnreachableError`` naming the endpoint once the
timeout passes; a guest that refuses the secret fails at once.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from common import channel_auth
from common.channel_auth import AuthenticationError
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
    """A hybrid-vsock VMM refused or garbled the ``CONNECT`` handshake, or the guest
    refused (or never asked for) the sandbox's secret."""


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
        case VsockEndpoint(cid, port, secret):
            return {"kind": "vsock", "cid": cid, "port": port, **_secret_record(secret)}
        case HybridVsockEndpoint(path, port, secret):
            hybrid = {"kind": "hybrid-vsock", "path": str(path), "port": port}
            return {**hybrid, **_secret_record(secret)}
        case SerialEndpoint(path):
            return {"kind": "serial", "path": str(path)}
    return {}


def _secret_record(secret: Path | None) -> dict[str, str]:
    """The secret's file, never its bytes: records are read by ``husk sandbox ls`` and others."""
    return {"secret_file": str(secret)} if secret is not None else {}


def endpoint_from_record(record: Mapping[str, Any]) -> AgentEndpoint | None:
    """The endpoint ``endpoint_record`` wrote (None for ``{}`` or an unknown kind)."""
    try:
        secret = Path(record["secret_file"]) if record.get("secret_file") else None
        match record.get("kind"):
            case "vsock":
                return VsockEndpoint(int(record["cid"]), int(record["port"]), secret)
            case "hybrid-vsock":
                return HybridVsockEndpoint(Path(record["path"]), int(record["port"]), secret)
            case "serial":
                return SerialEndpoint(Path(record["path"]))
    except (KeyError, TypeError, ValueError):
        pass
    return None


async def connect(
    endpoint: AgentEndpoint, timeout: float, purpose: int = channel_auth.AGENT
) -> trio.abc.Stream:
    """Open a stream to the agent (or, with ``purpose``, the debug console), retrying
    until ``timeout`` seconds pass; on vsock the guest has accepted the secret."""
    what = describe(endpoint)
    match endpoint:
        case VsockEndpoint(cid, port, secret):
            key = _secret_of(secret, what)
            dial: Callable[[], Awaitable[trio.abc.Stream]] = lambda: _authenticated(  # noqa: E731
                _vsock(cid, port), key, purpose, what
            )
        case HybridVsockEndpoint(path, port, secret):
            key = _secret_of(secret, what)
            dial = lambda: _authenticated(  # noqa: E731
                _hybrid_vsock(str(path), port), key, purpose, what
            )
        case SerialEndpoint(path):
            dial = lambda: _unix(str(path))  # noqa: E731
    return await _retry(dial, timeout, what)


def _secret_of(path: Path | None, what: str) -> bytes:
    """The sandbox's secret for a vsock endpoint (read by the shim or by root's ``husk exec``)."""
    if path is None:
        raise HandshakeError(f"{what}: the endpoint names no secret file; the guest would refuse")
    try:
        return channel_auth.read_secret(path)
    except AuthenticationError as e:
        raise HandshakeError(f"{what}: {e}") from None


async def authenticate(stream: trio.abc.Stream, secret: bytes, purpose: int, what: str) -> None:
    """Answer the guest's challenge on a connected stream (within ``channel_auth.TIMEOUT``)."""
    try:
        with trio.fail_after(channel_auth.TIMEOUT):
            await channel_auth.prove(stream, secret, purpose)
    except trio.TooSlowError:
        raise HandshakeError(
            f"{what}: the guest sent no handshake within {channel_auth.TIMEOUT:g} s "
            "(a guest image older than this shim? run `husk image build`)"
        ) from None
    except AuthenticationError as e:
        raise HandshakeError(f"{what}: {e}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise OSError(errno.ECONNRESET, f"the connection ended during the handshake: {e}") from None


async def _authenticated(
    connecting: Awaitable[trio.abc.Stream], secret: bytes, purpose: int, what: str
) -> trio.abc.Stream:
    stream = await connecting
    try:
        await authenticate(stream, secret, purpose, what)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


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
