"""Cloud Hypervisor's REST API: HTTP/1.1 on its unix socket, framed by h11, on trio.

Every request opens its own connection, as ``ch-remote`` does: Cloud
Hypervisor answers one request at a time, a connection carries no state, and a
VMM that died shows at the next connect. Requests go to ``/api/v1/<endpoint>``;
bodies are JSON. File descriptors (a tap's queues for ``vm.add-net``) travel
with the request bytes as ``SCM_RIGHTS``, which is how Cloud Hypervisor takes
them (its HTTP server reads them from the same ``recvmsg``).

Errors, as Cloud Hypervisor reports them: a status of 400 and up, with a body
that is a JSON array of messages (the chain of causes), e.g. ``404 ["VM is not
created"]`` for ``vm.boot`` before ``vm.create``. ``ApiError`` carries the status
and the messages on one line::

    HypervisorError
     ├── ApiError            the VMM answered with an error status
     └── ApiUnreachableError no socket, refused, or closed before an answer
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trio

from shim.errors import DeadlineExceededError, HypervisorError

#: the API's root, from the ``servers`` entry of Cloud Hypervisor's OpenAPI document
API_ROOT = "/api/v1/"
#: the most a response may hold (Cloud Hypervisor's own request limit is 4 MiB too)
MAX_RESPONSE = 4 << 20
_CHUNK = 64 * 1024
#: ``connect`` errors that mean "no VMM listens there (yet)"
_ABSENT = {errno.ENOENT, errno.ECONNREFUSED}


class ApiError(HypervisorError):
    """Cloud Hypervisor answered a request with an error status."""

    def __init__(
        self, method: str, endpoint: str, status: int, reason: str, messages: Sequence[str]
    ) -> None:
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.messages = tuple(messages)
        detail = ": " + "; ".join(self.messages) if self.messages else ""
        super().__init__(f"cloud-hypervisor: {method} {endpoint}: {status} {reason}{detail}")


class ApiUnreachableError(HypervisorError):
    """Nothing answered on the API socket: no socket, refused, or closed mid-request."""

    def __init__(self, message: str, *, absent: bool = False) -> None:
        #: the socket file is missing or nobody listens on it (not a broken answer)
        self.absent = absent
        super().__init__(message)


@dataclass(frozen=True)
class Response:
    """A successful answer: its status and JSON body (None when there is none)."""

    status: int
    body: Any


class ApiClient:
    """Requests to one Cloud Hypervisor API socket, each with a deadline."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    async def get(self, endpoint: str) -> Any:
        """``GET`` an endpoint; its JSON body."""
        return (await self.request("GET", endpoint)).body

    async def put(self, endpoint: str, body: Any = None, fds: Sequence[int] = ()) -> Any:
        """``PUT`` an endpoint (with a JSON body, and fds passed along); its JSON body or None."""
        return (await self.request("PUT", endpoint, body, fds)).body

    async def request(
        self,
        method: str,
        endpoint: str,
        body: Any = None,
        fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> Response:
        """Send one request and read its answer; raise ``ApiError`` on an error status."""
        limit = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                status, reason, data = await self._exchange(method, endpoint, body, fds)
        except trio.TooSlowError:
            raise DeadlineExceededError(
                f"cloud-hypervisor: {method} {endpoint} got no answer within {limit:g} s"
            ) from None
        if status >= 400:
            raise ApiError(method, endpoint, status, reason, _messages(data))
        if not data.strip():
            return Response(status, None)
        try:
            return Response(status, json.loads(data))
        except ValueError:
            raise HypervisorError(
                f"cloud-hypervisor: {method} {endpoint}: answer is not JSON"
            ) from None

    async def _exchange(
        self, method: str, endpoint: str, body: Any, fds: Sequence[int]
    ) -> tuple[int, str, bytes]:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", "localhost"), ("Accept", "application/json")]
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        wire = conn.send(h11.Request(method=method, target=API_ROOT + endpoint, headers=headers))
        if payload:
            wire += conn.send(h11.Data(data=payload))
        wire += conn.send(h11.EndOfMessage())
        sock = await self._connect()
        with sock:
            await _send(sock, wire, fds)
            return await _receive(sock, conn, f"{method} {endpoint}")

    async def _connect(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise ApiUnreachableError(
                f"cloud-hypervisor: cannot connect to its API socket {self.path}: "
                f"{exc.strerror or exc}",
                absent=exc.errno in _ABSENT,
            ) from None
        return sock


async def _send(sock: trio.socket.SocketType, wire: bytes, fds: Sequence[int]) -> None:
    """Write the request; the fds ride on its first bytes, as one ``sendmsg``."""
    view = memoryview(wire)
    try:
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            view = view[await sock.sendmsg([view], ancillary) :]
        while view:
            view = view[await sock.send(view) :]
    except OSError as exc:
        raise ApiUnreachableError(
            f"cloud-hypervisor: the API connection broke while sending: {exc.strerror or exc}"
        ) from None


async def _receive(
    sock: trio.socket.SocketType, conn: h11.Connection, what: str
) -> tuple[int, str, bytes]:
    status, reason, body = 0, "", bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HypervisorError(f"cloud-hypervisor: {what}: not an HTTP answer: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                chunk = await sock.recv(_CHUNK)
            except OSError as exc:
                chunk = b""
                if exc.errno != errno.ECONNRESET:
                    raise
            if not chunk and status == 0:
                raise ApiUnreachableError(f"cloud-hypervisor closed the API connection on {what}")
            conn.receive_data(chunk)
        elif isinstance(event, h11.Response):
            status, reason = event.status_code, event.reason.decode(errors="replace")
            if not reason:
                with contextlib.suppress(ValueError):
                    reason = HTTPStatus(status).phrase
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE:
                raise HypervisorError(f"cloud-hypervisor: {what}: answer longer than 4 MiB")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, reason, bytes(body)


def _messages(data: bytes) -> list[str]:
    """Cloud Hypervisor's error body: a JSON array of messages (else the text itself)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        text = data.decode(errors="replace").strip()
        return [text[:500]] if text else []
    if isinstance(parsed, list):
        return [str(m)[:500] for m in parsed[:8]]
    return [str(parsed)[:500]]
