"""Where the agent listens: vsock, the virtio-serial port, or a unix socket (host tests).

``--listen`` takes one of::

    auto                  vsock:1024 if /dev/vsock exists, and the virtio-serial port
                          if it exists (both at once when both do)
    vsock[:PORT]          AF_VSOCK, any CID, PORT (default 1024)
    serial[:PATH]         the virtio-serial port (default /dev/virtio-ports/agent.channel.0)
    unix:PATH             a unix socket (the agent on a host, for tests)

A connection on vsock or a unix socket is served only once its peer has
proved the sandbox's secret (:mod:`guest.agent.auth`); virtio-serial's host
end is a root-only socket and needs no proof.

virtio-serial is one byte stream with no connections: the agent serves one
ttrpc connection per host session on it (a new host client is told apart by
its stream ids, see :mod:`guest.agent.host_sessions`) and, when the port ends
(EOF or EIO: the host side closed or never opened its end), closes the port,
waits a little and opens it again.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from guest.agent.host_sessions import HostSessions
from ttrpc.server import Admit, Server

log = logging.getLogger("husk.agent.channel")

VSOCK_PORT = 1024
SERIAL_PORT = Path("/dev/virtio-ports/agent.channel.0")
VSOCK_DEVICE = Path("/dev/vsock")
SERIAL_WAIT = 10.0
"""Seconds to wait at start for the virtio-serial port when it is the only channel."""
REOPEN_DELAY = (0.02, 0.5)
"""First and longest pause before reopening virtio-serial after its peer went away."""


@dataclass(frozen=True)
class ListenAddress:
    """One place to listen on."""

    kind: str
    path: str = ""
    port: int = VSOCK_PORT

    def __str__(self) -> str:
        return f"vsock:{self.port}" if self.kind == "vsock" else f"{self.kind}:{self.path}"


def parse_listen(text: str) -> list[ListenAddress]:
    """Parse a ``--listen`` value (see the module docs)."""
    kind, _, rest = text.partition(":")
    if kind == "auto" and not rest:
        return detect()
    if kind == "vsock":
        try:
            return [ListenAddress("vsock", port=int(rest) if rest else VSOCK_PORT)]
        except ValueError:
            raise ValueError(f"bad vsock port in --listen {text!r}") from None
    if kind == "serial":
        return [ListenAddress("serial", path=rest or str(SERIAL_PORT))]
    if kind == "unix" and rest:
        return [ListenAddress("unix", path=rest)]
    raise ValueError(
        f"bad --listen {text!r}: expected auto, vsock[:PORT], serial[:PATH] or unix:PATH"
    )


def detect(
    vsock_device: Path = VSOCK_DEVICE, serial_port: Path = SERIAL_PORT
) -> list[ListenAddress]:
    """Every channel this guest has; virtio-serial is assumed when neither shows yet."""
    found = []
    if vsock_device.exists():
        found.append(ListenAddress("vsock"))
    if serial_port.exists() or not found:
        found.append(ListenAddress("serial", path=str(serial_port)))
    return found


async def serve(
    server: Server,
    address: ListenAddress,
    admit: Admit,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``address`` until cancelled (or, for sockets, until ``server.shutdown()``).

    Socket connections (unix, vsock) are served only when ``admit`` lets them in.
    """
    if address.kind == "unix":
        await server.serve_unix(address.path, admit=admit, task_status=task_status)
    elif address.kind == "vsock":
        await serve_vsock(server, address.port, admit, task_status=task_status)
    else:
        await serve_serial(server, Path(address.path), task_status=task_status)


async def serve_vsock(
    server: Server,
    port: int,
    admit: Admit,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on AF_VSOCK (any CID) and serve every connection ``admit`` lets in."""
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        await sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    log.info("listening on vsock port %d", port)
    await server.serve_listener(trio.SocketListener(sock), admit=admit, task_status=task_status)


async def _wait_for(path: Path, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while not path.exists():
            await trio.sleep(0.05)


async def serve_serial(
    server: Server, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ttrpc on the virtio-serial port, reopening it whenever the host goes away."""
    await _wait_for(path, SERIAL_WAIT)
    log.info("serving on virtio-serial %s", path)
    task_status.started()
    delay = REOPEN_DELAY[0]
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENXIO, errno.EIO):
                raise
            log.debug("cannot open %s yet: %s", path, exc)
            await trio.sleep(REOPEN_DELAY[1])
            continue
        started = trio.current_time()
        await _serve_port(server, trio.lowlevel.FdStream(fd))
        # A port whose host end is closed reads EOF at once: back off, don't spin.
        lasted = trio.current_time() - started
        delay = REOPEN_DELAY[0] if lasted > 1.0 else min(delay * 2, REOPEN_DELAY[1])
        log.debug("virtio-serial connection ended after %.2fs; reopening", lasted)
        await trio.sleep(delay)


async def _serve_port(server: Server, port: trio.lowlevel.FdStream) -> None:
    """Serve each host session of an open port in turn; close the port at its end."""
    sessions = HostSessions(port)
    try:
        await server.serve_stream(sessions.next())
        while sessions.host_reconnected:
            await server.serve_stream(sessions.next())
    finally:
        await trio.aclose_forcefully(port)
