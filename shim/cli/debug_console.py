"""``husk exec <sandbox>``: this terminal on a root shell in the sandbox's guest.

The sandbox's record names the console's endpoint (a root-only socket in its
state dir, or a vsock port and the sandbox's 0600 secret file, whose secret
the guest wants proved before it starts a shell) when it was started with
``[agent.husk] debug_console = true``; without one ``husk exec`` says so in
one line. The
terminal goes to raw mode (restored on the way out), window size changes are
passed on, and the session ends when the shell exits (with its status), when
the console's channel ends, or on ``^]`` (the telnet escape), which leaves the
shell to be hung up. When stdin ends (a pipe), ^D is sent: the shell exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from common import channel_auth, console
from shim.agent.transport import connect, describe, endpoint_from_record
from shim.errors import DeadlineExceededError, FailedPreconditionError, NotFoundError
from shim.hypervisor import AgentEndpoint
from shim.sandbox.state import RECORD, SandboxState

#: ^], as telnet and virsh console
ESCAPE = b"\x1d"
#: ^D at the start of a line: the shell reads end of file
EOT = b"\x04"
CONNECT_TIMEOUT = 10.0
#: the guest answers OPEN within this; longer means someone else holds the console
STARTED_TIMEOUT = 15.0
READ_CHUNK = 16 * 1024


def endpoint_of(root: Path, sandbox_id: str) -> AgentEndpoint:
    """The console of a running sandbox; a one-line error saying why there is none."""
    directory = root / sandbox_id
    if not (directory / RECORD).exists():
        raise NotFoundError(f"sandbox {sandbox_id} not found under {root} (see `husk sandbox ls`)")
    state = SandboxState.load(directory)
    if not state.shim_alive():
        raise FailedPreconditionError(f"sandbox {sandbox_id} is not running")
    endpoint = endpoint_from_record(state.debug_console)
    if endpoint is None:
        raise FailedPreconditionError(
            f"sandbox {sandbox_id} has no debug console: set [agent.husk] debug_console = true "
            "in configuration.toml; it applies to sandboxes started after that"
        )
    return endpoint


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on ``fd``; 24x80 when it is none."""
    try:
        rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 24, 80
    return (rows or 24), (columns or 80)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to ``fd`` (a blocking terminal or pipe)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class Outcome:
    """How a session ended: the shell's status, or None (detached, or the channel ended)."""

    status: int | None = None
    detached: bool = False


class Attachment:
    """One ``husk exec`` session over a connected console stream."""

    def __init__(self, stream: trio.abc.Stream, stdin: int = 0, stdout: int = 1) -> None:
        self.stream = stream
        self.stdin = stdin
        self.stdout = stdout
        self.outcome = Outcome()
        self._send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def open(self, term: str) -> console.Decoder:
        """Ask for a shell and wait until it runs; returns the decoder past STARTED."""
        await self.send(console.encode_open(*terminal_size(self.stdin), term))
        decoder = console.Decoder()
        with trio.move_on_after(STARTED_TIMEOUT):
            while True:
                data = await self.stream.receive_some(READ_CHUNK)
                if not data:
                    raise FailedPreconditionError("the debug console closed before a shell started")
                for frame in decoder.feed(bytes(data)):
                    if frame.kind == console.STARTED:
                        return decoder
        raise DeadlineExceededError(
            f"no shell answered within {STARTED_TIMEOUT:g} s (another `husk exec` may be "
            "attached, or the guest was started without the debug console)"
        )

    async def run(self, decoder: console.Decoder) -> Outcome:
        """Copy both ways until the shell exits, the channel ends or ^] is typed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keyboard, nursery.cancel_scope)
            nursery.start_soon(self._resizes)
            await self._screen(decoder)
            nursery.cancel_scope.cancel()
        return self.outcome

    async def _screen(self, decoder: console.Decoder) -> None:
        while True:
            try:
                data = await self.stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return
            for frame in decoder.feed(bytes(data)):
                if frame.kind == console.OUTPUT:
                    write_all(self.stdout, frame.payload)
                elif frame.kind == console.EXITED:
                    self.outcome.status = console.status_of(frame)
                    return

    async def _keyboard(self, scope: trio.CancelScope) -> None:
        while True:
            data = await trio.to_thread.run_sync(
                os.read, self.stdin, READ_CHUNK, abandon_on_cancel=True
            )
            if not data:
                await self.send(console.encode(console.INPUT, EOT))
                return
            before, escape, _ = data.partition(ESCAPE)
            if before:
                await self.send(console.encode_data(console.INPUT, before))
            if escape:
                await self.send(console.encode(console.CLOSE))
                self.outcome.detached = True
                scope.cancel()
                return

    async def _resizes(self) -> None:
        with trio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                await self.send(console.encode_resize(*terminal_size(self.stdin)))


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on ``fd`` while inside, when it is a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach(endpoint: AgentEndpoint, sandbox_id: str) -> int:
    """The whole session; returns the exit status for ``husk exec``."""
    stream = await connect(endpoint, CONNECT_TIMEOUT, channel_auth.DEBUG_CONSOLE)
    async with stream:
        session = Attachment(stream)
        decoder = await session.open(os.environ.get("TERM", "linux"))
        with raw_terminal(0):
            outcome = await session.run(decoder)
    if outcome.detached:
        print(f"\r\nhusk: left the debug console of sandbox {sandbox_id}", file=sys.stderr)
        return 0
    if outcome.status is None:
        print(f"\r\nhusk: the debug console of sandbox {sandbox_id} ({describe(endpoint)}) "
              "closed", file=sys.stderr)  # fmt: skip
        return 1
    return outcome.status


def run(root: Path, sandbox_id: str) -> int:
    """``husk exec``: attach and return the shell's exit status."""
    endpoint = endpoint_of(root, sandbox_id)
    return trio.run(attach, endpoint, sandbox_id)
