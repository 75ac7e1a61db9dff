"""``GET /metrics`` over HTTP/1.1 on a root-only unix socket, served with trio.

One request per connection (``Connection: close``), as a Prometheus scraper or
``curl --unix-socket`` sends it; anything but ``GET /metrics`` gets 404 or 405.
The socket is made 0600 before it is bound (umask) so no other user ever
reaches it: the metrics name containers and their sizes.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

log = logging.getLogger("husk.metrics")

#: the largest request head read, and how long a client gets to send it
REQUEST_LIMIT = 8 * 1024
REQUEST_TIMEOUT = 10.0
#: makes the body of one scrape and its Content-Type
Render = Callable[[], Awaitable[tuple[bytes, str]]]


def response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head up to its blank line; None if it is too long or cut off."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > REQUEST_LIMIT:
            return None
        chunk = await stream.receive_some(REQUEST_LIMIT)
        if not chunk:
            return None
        data += chunk
    return data.partition(b"\r\n\r\n")[0]


async def answer(head: bytes | None, render: Render) -> bytes:
    """The response to one request head."""
    if head is None:
        return response("400 Bad Request", b"bad request\n")
    words = head.split(b"\r\n", 1)[0].split()
    if len(words) != 3 or not words[2].startswith(b"HTTP/1."):
        return response("400 Bad Request", b"bad request\n")
    method, target = words[0], words[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return response("404 Not Found", b"only /metrics is served here\n")
    if method not in (b"GET", b"HEAD"):
        return response("405 Method Not Allowed", b"use GET\n")
    body, content_type = await render()
    full = response("200 OK", body, content_type)
    return full[: len(full) - len(body)] if method == b"HEAD" else full


async def handle(stream: trio.abc.Stream, render: Render) -> None:
    """Answer one connection, then close it."""
    async with stream:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                head = await read_head(stream)
                await stream.send_all(await answer(head, render))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("metrics request failed")
            return


def bind(path: Path) -> trio.socket.SocketType:
    """A listening unix socket at ``path``, mode 0600 from the start."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return trio.socket.from_stdlib_socket(sock)


async def serve(
    path: Path,
    render: Render,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` at ``path`` until cancelled; the socket is removed at the end."""
    sock = bind(path)
    try:
        listener = trio.SocketListener(sock)
        log.info("metrics on %s", path)
        task_status.started()

        async def on_connection(stream: trio.SocketStream) -> None:
            await handle(stream, render)

        await trio.serve_listeners(on_connection, [listener])
    finally:
        sock.close()
        path.unlink(missing_ok=True)
