"""The guest's console, kept in a bounded log.

A hostile guest can write to its serial console without end; a log file
that grows with it would fill the host's disk (or its tmpfs). The VMM exposes
the console as a unix socket (``Hypervisor.console_socket``) and
:class:`ConsoleLog` copies it into ``console.log``, a
:class:`~shim.rotating_log.RotatingLog`: once that file reaches ``cap`` bytes
it becomes ``console.log.1`` (replacing the previous one) and a new
``console.log`` starts, so at most ``2 * cap`` bytes are on disk and the most
recent output is always kept. Reading stops when the VMM closes the socket
(the VM is gone).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import trio

from shim.rotating_log import LOG_CAP, RotatingLog

log = logging.getLogger("husk.sandbox.console")

#: bytes in each of console.log and console.log.1
CONSOLE_CAP = LOG_CAP
READ_CHUNK = 64 * 1024
_CONNECT_RETRY = 0.05


class ConsoleLog:
    """Copies a console stream into ``path`` (and ``path.1``), each at most ``cap`` bytes."""

    def __init__(self, path: Path, cap: int = CONSOLE_CAP) -> None:
        self.path = path
        self.cap = cap
        self.rotated = path.with_name(path.name + ".1")

    async def run(self, socket_path: Path, connect_timeout: float = 10.0) -> None:
        """Connect to the console socket and copy until it closes."""
        stream = await self._connect(socket_path, connect_timeout)
        if stream is None:
            return
        async with stream:
            await self.copy(stream)

    async def _connect(self, path: Path, timeout: float) -> trio.SocketStream | None:
        with trio.move_on_after(timeout):
            while True:
                try:
                    return await trio.open_unix_socket(str(path))
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                        raise
                await trio.sleep(_CONNECT_RETRY)
        log.warning("no console at %s after %g s; the console is not logged", path, timeout)
        return None

    async def copy(self, stream: trio.abc.ReceiveStream) -> None:
        """Append what ``stream`` yields, rotating at ``cap``, until it ends."""
        log = RotatingLog(self.path, self.cap)
        try:
            while True:
                try:
                    data = await stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                log.write(data)
        finally:
            log.close()

    def relocate(self, path: Path) -> None:
        """The log's directory was renamed (the copy itself follows it: see ``RotatingLog``)."""
        self.path = path
        self.rotated = path.with_name(path.name + ".1")

    def tail(self, size: int = 4096) -> str:
        """The last ``size`` bytes of the console, for error messages."""
        return RotatingLog(self.path, self.cap).tail(size).decode(errors="replace")
