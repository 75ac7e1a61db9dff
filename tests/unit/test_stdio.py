"""stdio FIFO pumps: CloseIO keeps the bytes the client already wrote."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from shim.containerd.stdio import StdioPaths, StdioPump


class RecordingAgent:
    """The two stdin calls of the agent client, recorded in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.calls.append(("write", data))
        return len(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.calls.append(("close", b""))


async def test_close_io_forwards_bytes_still_in_the_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    agent = RecordingAgent()
    pump = StdioPump(agent, "c1", "", StdioPaths(stdin=str(fifo)))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump._stdin)
        writer = await trio.to_thread.run_sync(os.open, fifo, os.O_WRONLY)
        await trio.testing.wait_all_tasks_blocked()
        os.write(writer, b"from-stdin\n")  # the client writes, then CloseIO at once
        await pump.close_stdin()
        os.close(writer)
    assert agent.calls == [("write", b"from-stdin\n"), ("close", b"")]


async def test_fifo_eof_closes_stdin_once(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    agent = RecordingAgent()
    pump = StdioPump(agent, "c1", "", StdioPaths(stdin=str(fifo)))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump._stdin)
        writer = await trio.to_thread.run_sync(os.open, fifo, os.O_WRONLY)
        os.write(writer, b"abc")
        os.close(writer)
    await pump.close_stdin()
    assert agent.calls == [("write", b"abc"), ("close", b"")]
