"""QMP events and the listeners that receive them.

QEMU sends events (``SHUTDOWN``, ``STOP``, ``RESUME``, ``DEVICE_DELETED``, ...)
whenever they happen, interleaved with command replies. The client's reader
hands each event to every listener whose names match. A listener must exist
*before* the command that causes its event, or the event may be missed, hence
the shape::

    async with qmp.listen("DEVICE_DELETED") as events:
        await qmp.execute("device_del", {"id": "blk0"})
        await events.wait_for(lambda e: e.data.get("device") == "blk0")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from plugins.qemu.qmp_errors import QmpConnectionLost, QmpError, QmpProtocolError


@dataclass(frozen=True)
class QmpEvent:
    """One asynchronous QMP event: its name, data and QEMU's timestamp (seconds)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> QmpEvent:
        """Parse ``{"event": ..., "data": ..., "timestamp": {...}}``."""
        name = msg.get("event")
        data = msg.get("data", {})
        if not isinstance(name, str) or not isinstance(data, dict):
            raise QmpProtocolError(f"malformed QMP event: {msg!r}")
        stamp = msg.get("timestamp", {})
        seconds = 0.0
        if isinstance(stamp, dict):
            seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        return cls(name=name, data=data, timestamp=seconds)


EventPredicate = Callable[[QmpEvent], bool]


class EventListener:
    """A queue of the events named at creation (all events if no names).

    Events queue without bound: QMP events are rare and small, and a bounded
    queue would let a slow listener stall the reader and every command.
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self._send, self._receive = trio.open_memory_channel[QmpEvent](math.inf)
        self._closed_by: QmpError | None = None

    def accepts(self, event: QmpEvent) -> bool:
        """Whether this listener wants ``event``."""
        return not self.names or event.name in self.names

    def put(self, event: QmpEvent) -> None:
        """Queue ``event`` (called by the client's reader, never blocks)."""
        with contextlib.suppress(trio.ClosedResourceError):
            self._send.send_nowait(event)

    def close(self, error: QmpError) -> None:
        """End the queue: receivers get ``error`` once the queued events are read."""
        if self._closed_by is None:
            self._closed_by = error
        self._send.close()

    async def get(self) -> QmpEvent:
        """The next event; raises the client's ``QmpError`` once the connection is gone."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_by or QmpConnectionLost("QMP listener closed") from None

    async def wait_for(self, predicate: EventPredicate | None = None) -> QmpEvent:
        """The next event for which ``predicate`` holds, dropping the others."""
        while True:
            event = await self.get()
            if predicate is None or predicate(event):
                return event

    def __aiter__(self) -> EventListener:
        return self

    async def __anext__(self) -> QmpEvent:
        try:
            return await self.get()
        except QmpError:
            raise StopAsyncIteration from None
