"""Copying a process's stdio between containerd's FIFOs and the guest agent.

Three loops per process, all bytes as they are (binary-safe):

- stdin FIFO → ``WriteStdin``; at the FIFO's EOF (or ``CloseIO``) → ``CloseStdin``;
- ``ReadStdout`` → stdout FIFO, until the agent reports EOF;
- ``ReadStderr`` → stderr FIFO (not in terminal mode: a pty has one output).

The outputs go where the process's :class:`~shim.containerd.outputs.Outputs`
say: containerd's FIFOs by default, or a file or a logger process for a
``file://`` or ``binary://`` stdout URI. An output with no destination is
still drained, so the guest process never blocks on a full pipe; a
destination whose reader went away is drained the same way.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from shim.agent.client import AgentClient
from ttrpc import ConnectionClosed, RpcError

log = logging.getLogger("husk.stdio")

STDIN_CHUNK = 32 * 1024
#: how long CloseIO waits for the FIFO's remaining bytes to reach the guest
STDIN_DRAIN_TIMEOUT = 5.0
OPEN_RETRY = 0.01


@dataclass(frozen=True)
class StdioPaths:
    """containerd's FIFO paths for one process ("" when not wanted)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


async def open_reader(path: str) -> trio.lowlevel.FdStream:
    """Open a FIFO for reading once a writer has it open (so EOF means EOF)."""
    fd = await trio.to_thread.run_sync(
        os.open, path, os.O_RDONLY | os.O_CLOEXEC, abandon_on_cancel=True
    )
    return trio.lowlevel.FdStream(fd)


async def open_writer(path: str) -> trio.lowlevel.FdStream:
    """Open a FIFO for writing, waiting for its reader (containerd opens it first)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO:  # no reader yet
                raise
            await trio.sleep(OPEN_RETRY)
            continue
        return trio.lowlevel.FdStream(fd)


class Sink(Protocol):
    """Where one output's bytes go."""

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``."""

    async def aclose(self) -> None:
        """Close this end."""


async def close_sink(sink: Sink) -> None:
    """Close a sink at once (as ``trio.aclose_forcefully``), ignoring a reader gone."""
    with trio.CancelScope() as scope:
        scope.cancel()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sink.aclose()


class Outputs(abc.ABC):
    """The destinations of one process's stdout and stderr."""

    @abc.abstractmethod
    async def open(self, which: str) -> Sink | None:
        """The sink for ``"stdout"`` or ``"stderr"`` (None: drain and drop)."""

    async def aclose(self) -> None:
        """Release what the destinations hold (a logger process, files)."""
        await trio.lowlevel.checkpoint()


class FifoOutputs(Outputs):
    """containerd's FIFOs, opened once their reader (containerd) has them open."""

    def __init__(self, paths: StdioPaths, label: str = "") -> None:
        self.paths = paths
        self._label = label

    async def open(self, which: str) -> Sink | None:
        path = self.paths.stdout if which == "stdout" else self.paths.stderr
        if not path:
            return None
        try:
            return await open_writer(path)
        except OSError as e:
            log.warning("%s: cannot open %s: %s", self._label, path, e)
            return None


class StdioPump:
    """The copy loops of one process; ``run`` lives in the sandbox's nursery."""

    def __init__(
        self,
        agent: AgentClient,
        container_id: str,
        exec_id: str,
        paths: StdioPaths,
        outputs: Outputs | None = None,
    ) -> None:
        self._agent = agent
        self._container_id = container_id
        self._exec_id = exec_id
        self.paths = paths
        self.outputs = outputs if outputs is not None else FifoOutputs(paths, container_id)
        self.output_done = trio.Event()
        self._stdin_scope = trio.CancelScope()
        self._stdin_closed = False
        # CloseIO must not drop bytes the client already wrote into the FIFO:
        # it interrupts a blocking read, and the loop then drains what is left.
        self._close_requested = False
        self._read_scope: trio.CancelScope | None = None
        self._stdin_done = trio.Event()

    async def run(self) -> None:
        """Copy until both outputs reach EOF; stdin copying stops then too."""
        try:
            async with trio.open_nursery() as nursery:
                if self.paths.stdin:
                    nursery.start_soon(self._stdin)
                async with trio.open_nursery() as outputs:
                    outputs.start_soon(self._output, self._read_stdout, "stdout")
                    if not self.paths.terminal:
                        outputs.start_soon(self._output, self._read_stderr, "stderr")
                self._stdin_scope.cancel()
        finally:
            self.output_done.set()

    async def close_stdin(self) -> None:
        """``CloseIO``: forward what the stdin FIFO still holds, then close stdin in the guest."""
        self._close_requested = True
        if self.paths.stdin and not self._stdin_done.is_set():
            if self._read_scope is not None:
                self._read_scope.cancel()
            with trio.move_on_after(STDIN_DRAIN_TIMEOUT):
                await self._stdin_done.wait()
            self._stdin_scope.cancel()
        await self._send_close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        """Pass a terminal resize to the agent."""
        await self._agent.tty_win_resize(self._container_id, self._exec_id, rows, cols)

    async def _send_close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        try:
            await self._agent.close_stdin(self._container_id, self._exec_id)
        except (RpcError, ConnectionClosed) as e:
            log.debug("%s/%s: CloseStdin: %s", self._container_id, self._exec_id, e)

    async def _stdin(self) -> None:
        try:
            with self._stdin_scope:
                fifo = await open_reader(self.paths.stdin)
                async with fifo:
                    while True:
                        data = await self._next_stdin_chunk(fifo)
                        if not data:
                            break
                        try:
                            await self._write_all(data)
                        except (RpcError, ConnectionClosed, trio.BrokenResourceError) as e:
                            # the process is gone or closed its stdin: nothing more to copy
                            log.debug("%s: stdin: %s", self._container_id, e)
                            return
            if not self._stdin_scope.cancelled_caught:
                await self._send_close_stdin()
        finally:
            self._stdin_done.set()

    async def _next_stdin_chunk(self, fifo: trio.lowlevel.FdStream) -> bytes:
        """The next bytes from the FIFO; after CloseIO, only what it already holds."""
        if not self._close_requested:
            with trio.CancelScope() as self._read_scope:
                return bytes(await fifo.receive_some(STDIN_CHUNK))
            self._read_scope = None
        try:
            return os.read(fifo.fileno(), STDIN_CHUNK)  # the FdStream's fd is non-blocking
        except BlockingIOError:
            return b""

    async def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = await self._agent.write_stdin(self._container_id, self._exec_id, bytes(view))
            if written <= 0:
                raise trio.BrokenResourceError("the agent accepted no stdin bytes")
            view = view[written:]

    async def _read_stdout(self) -> bytes:
        return await self._agent.read_stdout(self._container_id, self._exec_id)

    async def _read_stderr(self) -> bytes:
        return await self._agent.read_stderr(self._container_id, self._exec_id)

    async def _output(self, read: Callable[[], Awaitable[bytes]], which: str) -> None:
        sink = await self.outputs.open(which)
        try:
            while True:
                try:
                    data = await read()
                except (RpcError, ConnectionClosed):
                    return  # EOF (the agent answers it with an error) or the VM is gone
                if not data:
                    return
                if sink is not None:
                    try:
                        await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                        log.info(
                            "%s: the reader of its %s went away: %s", self._container_id, which, e
                        )
                        await close_sink(sink)
                        sink = None
        finally:
            if sink is not None:
                await close_sink(sink)
