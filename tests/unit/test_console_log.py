"""The guest console's log stays bounded, however much the guest writes."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from shim.sandbox.console import ConsoleLog


async def test_a_console_that_writes_without_end_stays_under_twice_the_cap(
    tmp_path: Path,
) -> None:
    console = ConsoleLog(tmp_path / "console.log", cap=4096)
    send, receive = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(console.copy, receive)
        for i in range(2000):
            await send.send_all(f"line {i:05d} of a guest that never stops\n".encode())
        await send.aclose()
    assert (tmp_path / "console.log").stat().st_size <= 4096
    assert (tmp_path / "console.log.1").stat().st_size == 4096
    assert console.tail().rstrip().endswith("line 01999 of a guest that never stops")


async def test_the_console_ends_with_its_stream(tmp_path: Path) -> None:
    console = ConsoleLog(tmp_path / "console.log")
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"husk-init: agent started\n")
    await send.aclose()
    await console.copy(receive)
    assert "agent started" in console.tail()
    assert not (tmp_path / "console.log.1").exists()
