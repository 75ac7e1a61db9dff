"""The guest's console, kept in a bounded log.

A hostile guest can write to its serial console without end; a log file
that grows with it would fill the host's disk (or its tmpfs). The VMM exposes
the console as a unix socket (``Hypervisor.console_socket``) and
:class:`ConsoleLog` copies it into ``console.log``: once that file reaches
``cap`` bytes it becomes ``console.log.1`` (replacing the previous one) and a
new ``console.log`` starts, so at most ``2 * cap`` bytes are on disk and the
most recent output is always kept. Reading stops when the VMM closes the
socket (the VM is gone).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import trio

log = logging.getLogger("husk.sandbox.console")

#: bytes in each of console.log and console.log.1
CONSOLE_CAP = 1 << 20
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
        fd = self._open()
        written = os.fstat(fd).st_size
        try:
            while True:
                try:
                    data = await stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                while data:
                    room = self.cap - written
                    if room <= 0:
                        os.close(fd)
                        os.replace(self.path, self.rotated)
                        fd, written = self._open(), 0
                        continue
                    chunk, data = data[:room], data[room:]
                    written += os.write(fd, chunk)
        finally:
            os.close(fd)

    def _open(self) -> int:
        return os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )

    def tail(self, size: int = 4096) -> str:
        """The last ``size`` bytes of the console, for error messages."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""
