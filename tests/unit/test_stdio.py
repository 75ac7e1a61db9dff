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


class OutputAgent:
    """An agent whose process printed fixed stdout and stderr, then reached EOF."""

    def __init__(self, stdout: list[bytes], stderr: list[bytes]) -> None:
        self.streams = {"stdout": list(stdout), "stderr": list(stderr)}

    async def _next(self, which: str) -> bytes:
        await trio.lowlevel.checkpoint()
        chunks = self.streams[which]
        return chunks.pop(0) if chunks else b""

    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        return await self._next("stdout")

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        return await self._next("stderr")


async def test_the_pump_writes_outputs_where_the_log_uri_says(tmp_path: Path) -> None:
    from shim.containerd.outputs import OutputsRequest, open_outputs

    log = tmp_path / "c1.log"
    paths = StdioPaths(stdout=f"file://{log}", stderr=f"file://{log}")
    outputs = await open_outputs(OutputsRequest(paths, "c1", "default", "container c1"))
    agent = OutputAgent([b"out-1\n", b"out-2\n"], [b"err-1\n"])
    pump = StdioPump(agent, "c1", "", paths, outputs)  # type: ignore[arg-type]
    await pump.run()
    assert sorted(log.read_bytes().splitlines()) == [b"err-1", b"out-1", b"out-2"]
