"""stdio plumbing with a plain subprocess: pipes held by the agent, EOF as Kata answers it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from guest.agent import command
from guest.agent.errors import StreamClosedError
from guest.agent.process import ProcessIO
from guest.agent.reaper import Reaper
from shim.errors import FailedPreconditionError
from ttrpc.codes import Code


async def read_to_eof(io: ProcessIO, which: str) -> bytes:
    out = b""
    while True:
        try:
            out += await io.read(which, 3)
        except StreamClosedError as exc:
            assert exc.code == Code.OUT_OF_RANGE
            return out


async def test_cat_echoes_stdin_and_ends_at_close() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        io, child = ProcessIO.with_pipes("cat")
        watch = command.spawn(reaper, ["cat"], stdin=child[0], stdout=child[1], stderr=child[2])
        for fd in child:
            os.close(fd)
        assert await io.write_stdin(b"hello ") == 6
        assert await io.write_stdin(b"world\n") == 6
        await io.close_stdin()
        with trio.fail_after(5):
            assert await read_to_eof(io, "stdout") == b"hello world\n"
            assert await read_to_eof(io, "stderr") == b""
            assert await watch.wait() == 0
        assert io.drained
        with pytest.raises(StreamClosedError, match="stdin of cat is closed"):
            await io.write_stdin(b"late")
        with pytest.raises(StreamClosedError):  # EOF stays EOF
            await io.read("stdout", 10)
        with pytest.raises(FailedPreconditionError, match="no terminal"):
            io.resize(24, 80)
        await io.aclose()
        nursery.cancel_scope.cancel()


async def test_concurrent_readers_take_turns() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        io, child = ProcessIO.with_pipes("printer")
        command.spawn(reaper, ["sh", "-c", "printf abc; sleep 0.1; printf def"], stdout=child[1])
        for fd in child:
            os.close(fd)
        got: list[bytes] = []

        async def reader() -> None:
            try:
                while True:
                    got.append(await io.read("stdout", 0))
            except StreamClosedError:
                pass

        with trio.fail_after(5):
            async with trio.open_nursery() as readers:
                readers.start_soon(reader)
                readers.start_soon(reader)
        assert b"".join(got) == b"abcdef"
        await io.aclose()
        nursery.cancel_scope.cancel()


async def test_command_run_captures_output_and_reports_failure() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        done = await command.run(reaper, ["cat"], input=b"in")
        assert (done.status, done.stdout) == (0, b"in")
        with pytest.raises(command.CommandError, match="exit status 2: boom"):
            await command.run(reaper, ["sh", "-c", "echo boom >&2; exit 2"])
        with pytest.raises(FileNotFoundError):
            await command.run(reaper, ["/no/such/program"])
        nursery.cancel_scope.cancel()


async def test_children_can_start_with_their_own_oom_score_adj(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the agent keeps -1000 for itself; its children (crun, runc) must not inherit it
    own = int(Path("/proc/self/oom_score_adj").read_text())
    wanted = min(own + 7, 1000)  # raising needs no privilege
    monkeypatch.setattr(command, "_child_oom_score_adj", None)
    command.reset_children_oom_score_adj(wanted)
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        done = await command.run(reaper, ["cat", "/proc/self/oom_score_adj"])
        assert int(done.stdout) == wanted
        done = await command.run(reaper, ["sh", "-c", 'echo "$0:$1"', "a b", "c"])
        assert done.stdout == b"a b:c\n"  # arguments pass through untouched
        with pytest.raises(FileNotFoundError):
            await command.run(reaper, ["no-such-program-anywhere"])
        nursery.cancel_scope.cancel()
    assert int(Path("/proc/self/oom_score_adj").read_text()) == own


async def test_one_child_can_start_with_its_process_specs_oom_score_adj(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # runc/crun exec apply no oomScoreAdj: the exec'd process keeps what its runtime started with
    own = int(Path("/proc/self/oom_score_adj").read_text())
    monkeypatch.setattr(command, "_child_oom_score_adj", min(own + 3, 1000))
    wanted = min(own + 5, 1000)
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        read_fd, write_fd = os.pipe()
        watch = command.spawn(
            reaper, ["cat", "/proc/self/oom_score_adj"], stdout=write_fd, oom_score_adj=wanted
        )
        os.close(write_fd)
        assert await watch.wait() == 0
        assert int(await command.read_all(read_fd)) == wanted
        done = await command.run(reaper, ["cat", "/proc/self/oom_score_adj"])
        assert int(done.stdout) == min(own + 3, 1000)  # the others keep the agent-wide reset
        nursery.cancel_scope.cancel()
