"""The console socket: where ``runc`` hands over a container's pty master.

With ``process.terminal`` set, ``runc create``/``runc exec --console-socket``
connect to this unix socket once and send the master fd with SCM_RIGHTS.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

import trio

from common.errors import HuskError


class ConsoleSocket:
    """A listening unix socket that receives one pty master fd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def __aenter__(self) -> ConsoleSocket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        await self._sock.bind(self.path)
        self._sock.listen(1)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def receive_master(self) -> int:
        """Accept runc's connection and return the pty master fd it sends."""
        conn, _ = await self._sock.accept()
        with conn:
            fds = array.array("i")
            _, ancdata, _, _ = await conn.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise HuskError(f"runc sent no terminal on the console socket {self.path}")
        for extra in fds[1:]:
            os.close(extra)
        master = fds[0]
        os.set_inheritable(master, False)
        return master
