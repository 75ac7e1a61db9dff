"""The debug console: a root shell on a pty, for ``husk exec`` on the host.

Served only when the kernel command line has ``husk.debug_console=1`` (the
shim adds it for ``[agent.husk] debug_console = true``; Kata's
``agent.debug_console`` is accepted too). It listens on its own channel, never
the agent's: the virtio-serial port ``console.channel.0`` or, where the guest
has vsock, port 1026. The framing is :mod:`common.console`. On vsock, which
every host process can reach, a connection gets a shell only after proving
the sandbox's secret (:mod:`guest.agent.auth`); the virtio-serial port's host
end is a root-only socket.

The agent spawns the shell rather than the init script because a usable shell
needs a pty whose size follows the host's terminal, and the agent already
keeps ptys and reaps children (:mod:`guest.agent.reaper`). A shell is a
session leader with the pty as its controlling terminal, so job control and
^C work; ``CLOSE``, a new ``OPEN`` or the host going away hangs it up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import termios
from pathlib import Path

import trio

from common import console
from guest.agent.auth import Gate
from guest.agent.reaper import ExitWatch, Reaper

log = logging.getLogger("husk.agent.console")

SERIAL_PORT = Path("/dev/virtio-ports") / console.SERIAL_PORT_NAME
VSOCK_DEVICE = Path("/dev/vsock")
SHELL = ("/bin/sh", "-i")
SHELL_ENV = {
    "HOME": "/root",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PS1": "husk-debug# ",
    "SHELL": "/bin/sh",
    "USER": "root",
}
#: how long a hung-up shell gets before SIGKILL
HANGUP_GRACE = 1.0
#: first and longest pause before reopening the port after the host went away
REOPEN_DELAY = (0.05, 0.5)
READ_CHUNK = 16 * 1024


def enabled(cmdline: str) -> bool:
    """Whether the kernel command line turns the debug console on."""
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key in (console.CMDLINE_SWITCH, "agent.debug_console"):
            return value.lower() in ("", "1", "true", "yes", "on")
    return False


class Shell:
    """One root shell on a fresh pty."""

    def __init__(self, master: int, pid: int, watch: ExitWatch) -> None:
        self.master = master
        self.pid = pid
        self.watch = watch
        self.output = trio.lowlevel.FdStream(master)
        self.input = trio.lowlevel.FdStream(os.dup(master))

    @classmethod
    def spawn(cls, reaper: Reaper, rows: int, columns: int, term: str) -> Shell:
        """Start the shell as a session leader on a new pty of the given size."""
        master, slave = os.openpty()
        try:
            set_size(master, rows, columns)
            env = {**SHELL_ENV, "TERM": term or "linux"}
            # setsid, then opening the pty makes it the controlling terminal
            pid = os.posix_spawn(
                SHELL[0],
                list(SHELL),
                env,
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
                    (os.POSIX_SPAWN_DUP2, 0, 1),
                    (os.POSIX_SPAWN_DUP2, 0, 2),
                ],
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM),
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        log.info("debug console: shell %d started", pid)
        return cls(master, pid, reaper.watch(pid))

    def resize(self, rows: int, columns: int) -> None:
        """Follow the host terminal's size."""
        with contextlib.suppress(OSError):
            set_size(self.master, rows, columns)

    async def hang_up(self) -> None:
        """SIGHUP the shell's session, SIGKILL it if it lingers, close the pty."""
        for signum in (signal.SIGHUP, signal.SIGKILL):
            if self.watch.exited:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)
            with trio.move_on_after(HANGUP_GRACE):
                await self.watch.wait()
        await trio.aclose_forcefully(self.input)
        await trio.aclose_forcefully(self.output)


def set_size(fd: int, rows: int, columns: int) -> None:
    """TIOCSWINSZ on a pty."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


class Session:
    """The frames of one host stream: shells started, fed, resized and hung up in turn."""

    def __init__(self, stream: trio.abc.Stream, reaper: Reaper) -> None:
        self.stream = stream
        self.reaper = reaper
        self.shell: Shell | None = None
        self._send_lock = trio.Lock()
        self._pump_scope: trio.CancelScope | None = None

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def run(self) -> None:
        """Serve until the host's stream ends; the last shell is hung up then."""
        decoder = console.Decoder()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await self.stream.receive_some(READ_CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    try:
                        frames = decoder.feed(bytes(data))
                    except console.ConsoleProtocolError as e:
                        log.warning("debug console: %s; hanging up", e)
                        break
                    for frame in frames:
                        await self._handle(frame, nursery)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._end_shell()

    async def _handle(self, frame: console.Frame, nursery: trio.Nursery) -> None:
        if frame.kind == console.OPEN:
            await self._end_shell()
            rows, columns = console.size_of(frame)
            self.shell = Shell.spawn(self.reaper, rows, columns, console.term_of(frame))
            nursery.start_soon(self._pump, self.shell)
        elif self.shell is None:
            return
        elif frame.kind == console.INPUT:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.shell.input.send_all(frame.payload)
        elif frame.kind == console.RESIZE:
            self.shell.resize(*console.size_of(frame))
        elif frame.kind == console.CLOSE:
            await self._end_shell()

    async def _end_shell(self) -> None:
        shell, self.shell = self.shell, None
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        if shell is not None:
            await shell.hang_up()

    async def _pump(self, shell: Shell) -> None:
        """The pty's output to the host, then the shell's exit."""
        with trio.CancelScope() as self._pump_scope:
            await self.send(console.encode(console.STARTED))
            while True:
                try:
                    data = await shell.output.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""  # EIO: every holder of the pty's slave end is gone
                if not data:
                    break
                await self.send(console.encode_data(console.OUTPUT, data))
            status = await shell.watch.wait()
            log.info("debug console: shell %d exited with %d", shell.pid, status)
            await self.send(console.encode_exited(status))
            if self.shell is shell:
                self.shell = None
                await shell.hang_up()


async def serve_serial(reaper: Reaper, path: Path = SERIAL_PORT) -> None:
    """Sessions on the virtio-serial port, reopened whenever the host side closes."""
    delay = REOPEN_DELAY[0]
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENXIO, errno.EIO):
                raise
            await trio.sleep(REOPEN_DELAY[1])
            continue
        started = trio.current_time()
        port = trio.lowlevel.FdStream(fd)
        try:
            await Session(port, reaper).run()
        finally:
            await trio.aclose_forcefully(port)
        # with no host connected the port reads EOF at once: back off, don't spin
        lasted = trio.current_time() - started
        delay = REOPEN_DELAY[0] if lasted > 1.0 else min(delay * 2, REOPEN_DELAY[1])
        await trio.sleep(delay)


async def serve_vsock(reaper: Reaper, gate: Gate, port: int = console.VSOCK_PORT) -> None:
    """One session per vsock connection that passes ``gate``."""
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    await sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(4)

    async def handle(stream: trio.SocketStream) -> None:
        await serve_connection(stream, reaper, gate)

    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


async def serve_connection(stream: trio.abc.Stream, reaper: Reaper, gate: Gate) -> None:
    """A session on one connection, once its peer has proved the secret; closes it."""
    async with stream:
        if await gate(stream):
            await Session(stream, reaper).run()


async def serve(reaper: Reaper, gate: Gate) -> None:
    """The console on its virtio-serial port where the VM has one, else on vsock.

    The port decides: ``/dev/vsock`` exists whenever the vsock modules are
    loaded, with or without a vsock device; the host adds the port only when
    the agent itself is on virtio-serial.
    """
    if not SERIAL_PORT.exists() and not VSOCK_DEVICE.exists():
        log.warning("debug console: no %s and no vsock; not served", SERIAL_PORT)
        return
    if SERIAL_PORT.exists():
        log.info("debug console on %s: a root shell for `husk exec`", SERIAL_PORT)
        await serve_serial(reaper)
    else:
        log.info("debug console on vsock port %d: a root shell for `husk exec`", console.VSOCK_PORT)
        gate.check()
        await serve_vsock(reaper, gate)
