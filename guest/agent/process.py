"""A process the agent runs in a container: its stdio and its exit.

Without a terminal the agent holds the parent ends of three pipes; with one it
holds the pty master that runc hands over on the console socket. Reads block
until data arrives and raise :class:`StreamClosedError` at EOF, as Kata does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import termios

import trio

from common.errors import FailedPreconditionError
from guest.agent.errors import StreamClosedError
from guest.agent.reaper import ExitWatch

DEFAULT_READ = 32 * 1024
MAX_READ = 1024 * 1024


class OutputStream:
    """One readable stream (a pipe or the pty master), read by one caller at a time."""

    def __init__(self, name: str, stream: trio.lowlevel.FdStream) -> None:
        self.name = name
        self._stream = stream
        self._lock = trio.Lock()
        self.eof = False

    async def read(self, size: int) -> bytes:
        """Return the next bytes (at most ``size``); raise at EOF."""
        size = DEFAULT_READ if size <= 0 else min(size, MAX_READ)
        async with self._lock:
            if self.eof:
                raise StreamClosedError(f"{self.name} is at EOF")
            try:
                data = await self._stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # A pty master reads EIO once the last slave fd is closed.
                data = b""
            if not data:
                self.eof = True
                raise StreamClosedError(f"{self.name} is at EOF")
            return data

    async def aclose(self) -> None:
        """Close the agent's end."""
        self.eof = True
        await trio.aclose_forcefully(self._stream)


class ProcessIO:
    """The agent's ends of one process's stdio."""

    def __init__(self, label: str, terminal: bool) -> None:
        self.label = label
        self.terminal = terminal
        self._stdin: trio.lowlevel.FdStream | None = None
        self._stdin_lock = trio.Lock()
        self._stdin_closed = False
        self.stdout: OutputStream | None = None
        self.stderr: OutputStream | None = None
        self._master_fd: int | None = None

    @classmethod
    def with_pipes(cls, label: str) -> tuple[ProcessIO, tuple[int, int, int]]:
        """Make the three pipes; return the IO and the child's (stdin, stdout, stderr).

        The caller passes the child's fds to the process and then closes them.
        """
        io = cls(label, terminal=False)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        io._stdin = trio.lowlevel.FdStream(in_w)
        io.stdout = OutputStream(f"stdout of {label}", trio.lowlevel.FdStream(out_r))
        io.stderr = OutputStream(f"stderr of {label}", trio.lowlevel.FdStream(err_r))
        return io, (in_r, out_w, err_w)

    @classmethod
    def with_terminal(cls, label: str, master_fd: int) -> ProcessIO:
        """Wrap a pty master (the agent takes ownership of ``master_fd``)."""
        io = cls(label, terminal=True)
        # FdStream owns the fd it is given; stdin and stdout share one dup each.
        io._master_fd = master_fd
        io._stdin = trio.lowlevel.FdStream(os.dup(master_fd))
        io.stdout = OutputStream(f"terminal of {label}", trio.lowlevel.FdStream(master_fd))
        return io

    async def write_stdin(self, data: bytes) -> int:
        """Write all of ``data`` to the process's stdin; return its length."""
        if self._stdin is None or self._stdin_closed:
            raise StreamClosedError(f"stdin of {self.label} is closed")
        async with self._stdin_lock:
            try:
                await self._stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise StreamClosedError(f"stdin of {self.label} is closed: {exc}") from None
        return len(data)

    async def close_stdin(self) -> None:
        """Send EOF to the process's stdin.

        With a terminal the master stays open (closing it would hang up the
        terminal): the agent only stops accepting writes.
        """
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._stdin is not None:
            async with self._stdin_lock:
                await trio.aclose_forcefully(self._stdin)

    async def read(self, which: str, size: int) -> bytes:
        """Read from ``"stdout"`` or ``"stderr"``; with a terminal stderr is always at EOF."""
        stream = self.stdout if which == "stdout" else self.stderr
        if stream is None:
            raise StreamClosedError(
                f"{which} of {self.label} is at EOF (the process has a terminal)"
            )
        return await stream.read(size)

    def resize(self, rows: int, columns: int) -> None:
        """Set the terminal's window size (TIOCSWINSZ on the pty master)."""
        if self._master_fd is None or self.stdout is None or self.stdout.eof:
            raise FailedPreconditionError(f"{self.label} has no terminal to resize")
        winsize = struct.pack("HHHH", rows, columns, 0, 0)
        try:
            fcntl.ioctl(self._master_fd, termios.TIOCSWINSZ, winsize)
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EIO):
                raise FailedPreconditionError(f"the terminal of {self.label} is closed") from None
            raise

    @property
    def drained(self) -> bool:
        """True when every output stream has been read to EOF."""
        return all(s is None or s.eof for s in (self.stdout, self.stderr))

    async def aclose(self) -> None:
        """Close every end the agent holds."""
        self._stdin_closed = True
        if self._stdin is not None:
            await trio.aclose_forcefully(self._stdin)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                await stream.aclose()
        self._master_fd = None


class Process:
    """One process of a container: the init process or an exec'd one."""

    def __init__(
        self, container_id: str, exec_id: str, pid: int, io: ProcessIO, watch: ExitWatch, init: bool
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = pid
        self.io = io
        self.watch = watch
        self.init = init
        self.waited = False
        """Set once a WaitProcess call has returned this process's status."""

    @property
    def label(self) -> str:
        """How messages name this process."""
        return process_label(self.container_id, self.exec_id, self.init)

    @property
    def exited(self) -> bool:
        """True once the process has been reaped."""
        return self.watch.exited

    async def wait(self) -> int:
        """Block until the process exits; return its exit code (128 + signal if killed)."""
        return await self.watch.wait()

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless the process has already exited.

        The pid cannot be reused before the reaper has reaped it, so checking
        ``exited`` first makes this safe.
        """
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


def process_label(container_id: str, exec_id: str, init: bool) -> str:
    """Name a process in messages: ``container 'c1'`` or ``process 'e1' of container 'c1'``."""
    if init:
        return f"init process of container '{container_id}'"
    return f"process '{exec_id}' of container '{container_id}'"
