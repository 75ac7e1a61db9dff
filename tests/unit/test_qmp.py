"""The QMP client against a scripted fake QEMU on in-memory streams (no sleeps)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from plugins.qemu.qmp import QmpClient, open_qmp
from plugins.qemu.qmp_errors import (
    QmpCommandError,
    QmpConnectionLost,
    QmpError,
    QmpGreetingError,
    QmpProtocolError,
)
from shim.errors import HypervisorError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


class FakeQemu:
    """The QEMU end of a QMP connection, driven step by step by a test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, msg: dict[str, Any] | bytes) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\r\n"
        await self.stream.send_all(data)

    async def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            assert chunk, "client closed the connection"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def handshake(self) -> None:
        await self.send(GREETING)
        cap = await self.receive()
        assert cap["execute"] == "qmp_capabilities"
        await self.send({"return": {}, "id": cap["id"]})

    async def event(self, name: str, **data: Any) -> None:
        await self.send(
            {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 500000}}
        )


def pair() -> tuple[trio.abc.Stream, FakeQemu]:
    client_end, server_end = trio.testing.memory_stream_pair()
    return client_end, FakeQemu(server_end)


async def test_greeting_and_capabilities_then_command() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp:
            assert qmp.greeting["version"]["qemu"]["major"] == 7

            async def answer() -> None:
                cmd = await qemu.receive()
                assert cmd["execute"] == "query-status"
                assert "arguments" not in cmd
                await qemu.send({"return": {"status": "running"}, "id": cmd["id"]})

            nursery.start_soon(answer)
            assert await qmp.execute("query-status") == {"status": "running"}


async def test_command_arguments_are_sent() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp:

            async def answer() -> None:
                cmd = await qemu.receive()
                assert cmd["arguments"] == {"id": "blk0"}
                await qemu.send({"return": {}, "id": cmd["id"]})

            nursery.start_soon(answer)
            assert await qmp.execute("device_del", {"id": "blk0"}) == {}


async def test_replies_out_of_order_reach_their_commands() -> None:
    stream, qemu = pair()
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp:

            async def run(name: str) -> None:
                results[name] = await qmp.execute(name)

            async with trio.open_nursery() as inner:
                inner.start_soon(run, "first")
                first = await qemu.receive()
                inner.start_soon(run, "second")
                second = await qemu.receive()
                # answer the second before the first
                await qemu.send({"return": "two", "id": second["id"]})
                await qemu.send({"return": "one", "id": first["id"]})
    assert results == {"first": "one", "second": "two"}


async def test_error_reply_carries_class_and_desc() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp:

            async def answer() -> None:
                cmd = await qemu.receive()
                error = {"class": "DeviceNotFound", "desc": "Device 'x' not found"}
                await qemu.send({"error": error, "id": cmd["id"]})

            nursery.start_soon(answer)
            with pytest.raises(QmpCommandError) as info:
                await qmp.execute("device_del", {"id": "x"})
    assert info.value.error_class == "DeviceNotFound"
    assert info.value.desc == "Device 'x' not found"
    assert str(info.value) == "QMP device_del failed: Device 'x' not found (DeviceNotFound)"
    assert isinstance(info.value, HypervisorError)


async def test_an_error_in_the_block_leaves_it_unwrapped() -> None:
    """Callers catch QmpCommandError around ``open_qmp``, not an ExceptionGroup."""
    stream, qemu = pair()

    async def answer() -> None:
        await qemu.handshake()
        cmd = await qemu.receive()
        await qemu.send({"error": {"class": "GenericError", "desc": "no"}, "id": cmd["id"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with pytest.raises(QmpCommandError, match="QMP migrate failed: no"):
            async with open_qmp(stream) as qmp:
                await qmp.execute("migrate", {"uri": "exec:true"})


async def test_events_reach_matching_listeners_only() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with (
            open_qmp(stream) as qmp,
            qmp.listen("DEVICE_DELETED") as deleted,
            qmp.listen() as everything,
        ):
            await qemu.event("STOP")
            await qemu.event("DEVICE_DELETED", path="/machine/peripheral/blk0/virtio-backend")
            await qemu.event("DEVICE_DELETED", device="blk0", path="/machine/peripheral/blk0")
            event = await deleted.wait_for(lambda e: e.data.get("device") == "blk0")
            assert event.name == "DEVICE_DELETED"
            assert event.timestamp == 1.5
            names = [(await everything.get()).name for _ in range(3)]
            assert names == ["STOP", "DEVICE_DELETED", "DEVICE_DELETED"]


async def test_event_between_command_and_reply() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp, qmp.listen("SHUTDOWN") as shutdown:

            async def answer() -> None:
                cmd = await qemu.receive()
                await qemu.event("SHUTDOWN", guest=False, reason="host-qmp-quit")
                await qemu.send({"return": {}, "id": cmd["id"]})

            nursery.start_soon(answer)
            assert await qmp.execute("quit") == {}
            assert (await shutdown.get()).data["reason"] == "host-qmp-quit"


async def test_connection_loss_wakes_commands_and_listeners() -> None:
    stream, qemu = pair()
    woken: list[type[BaseException]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp, qmp.listen("SHUTDOWN") as shutdown:

            async def command() -> None:
                with pytest.raises(QmpConnectionLost) as info:
                    await qmp.execute("query-status")
                woken.append(type(info.value))

            async def listener() -> None:
                with pytest.raises(QmpConnectionLost):
                    await shutdown.get()
                woken.append(QmpConnectionLost)

            async with trio.open_nursery() as waiters:
                waiters.start_soon(command)
                waiters.start_soon(listener)
                await qemu.receive()  # the command is on its way, and waiting
                await qemu.stream.aclose()
            await qmp.wait_closed()
            assert qmp.closed
            with pytest.raises(QmpConnectionLost):
                await qmp.execute("query-status")
            async with qmp.listen("STOP") as late:
                with pytest.raises(QmpConnectionLost):
                    await late.get()
    assert woken == [QmpConnectionLost, QmpConnectionLost]


async def test_events_queued_before_loss_are_still_delivered() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp, qmp.listen("SHUTDOWN") as shutdown:
            await qemu.event("SHUTDOWN", guest=True, reason="guest-shutdown")
            await qemu.stream.aclose()
            await qmp.wait_closed()
            assert (await shutdown.get()).data["guest"] is True
            assert [e async for e in shutdown] == []


async def test_bad_greeting() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.send, {"hello": "world"})
        with pytest.raises(QmpGreetingError, match="expected a QMP greeting"):
            async with open_qmp(stream):
                pass


async def test_capabilities_refused() -> None:
    stream, qemu = pair()

    async def refuse() -> None:
        await qemu.send(GREETING)
        cap = await qemu.receive()
        await qemu.send({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": cap["id"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(QmpGreetingError, match="qmp_capabilities refused: nope"):
            async with open_qmp(stream):
                pass


async def test_eof_before_greeting() -> None:
    stream, qemu = pair()
    await qemu.stream.aclose()
    with pytest.raises(QmpConnectionLost):
        async with open_qmp(stream):
            pass


async def test_invalid_json_fails_waiters_with_protocol_error() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp:

            async def garble() -> None:
                await qemu.receive()
                await qemu.send(b"{not json\r\n")

            nursery.start_soon(garble)
            with pytest.raises(QmpProtocolError, match="invalid JSON"):
                await qmp.execute("query-status")


async def test_reader_in_callers_nursery_and_cancelled_command_drops_reply() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        qmp = QmpClient(stream)
        await qmp.negotiate()
        nursery.start_soon(qmp.run)
        cancelled = trio.Event()

        async def slow_caller(scope: trio.CancelScope) -> None:
            with scope:
                await qmp.execute("slow")
            cancelled.set()

        scope = trio.CancelScope()
        nursery.start_soon(slow_caller, scope)
        slow = await qemu.receive()
        scope.cancel()
        await cancelled.wait()
        await qemu.send({"return": "late", "id": slow["id"]})  # nobody waits: dropped

        async def answer() -> None:
            cmd = await qemu.receive()
            await qemu.send({"return": "fast", "id": cmd["id"]})

        nursery.start_soon(answer)
        assert await qmp.execute("fast") == "fast"
        await qmp.aclose()
        with pytest.raises(QmpError):
            await qmp.execute("after-close")


async def test_fds_need_a_socket() -> None:
    stream, qemu = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(qemu.handshake)
        async with open_qmp(stream) as qmp:
            with pytest.raises(QmpError, match="needs a unix socket"):
                await qmp.execute("getfd", {"fdname": "x"}, fds=[0])
