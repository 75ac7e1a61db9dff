"""Cloud Hypervisor's event monitor: what the VM went through, read from a pipe.

``cloud-hypervisor --event-monitor fd=N`` writes one JSON object per event
(``{"timestamp": {...}, "source": "vm", "event": "booted", "properties": ...}``),
pretty-printed and followed by a blank line. husk hands it the write end of a
pipe: Cloud Hypervisor writes to it without blocking, so when nobody reads, a
full pipe drops events instead of growing anything (the guest can cause events,
a panic or a reboot, as often as it likes).

What matters to husk is the end of the VM while the VMM lives on: Cloud
Hypervisor has no ``-no-reboot``, so a guest that panics (``panic=-1``) or
reboots is rebooted in place; a husk guest never reboots on purpose, so
``vm rebooting`` and ``guest panic`` mean the sandbox's VM is gone.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any

import trio

#: events after which the sandbox's VM is gone although the VMM still runs
VM_LOST = {("guest", "panic"), ("vm", "rebooting"), ("vm", "rebooted")}
#: the most bytes kept while an event is incomplete; a longer one is dropped
_MAX_PENDING = 64 * 1024
_CHUNK = 16 * 1024


@dataclass(frozen=True)
class Event:
    """One event: where from (``vm``, ``vmm``, ``guest``, ...), what, and its properties."""

    source: str
    event: str
    properties: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The event in words, for messages."""
        return f"{self.source} {self.event}"


class EventParser:
    """Splits the monitor's byte stream into events; bounded, tolerant of garbage."""

    def __init__(self) -> None:
        self._pending = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes; return the events they complete."""
        self._pending += data.decode(errors="replace")
        events = []
        while True:
            text = self._pending.lstrip()
            if not text:
                self._pending = ""
                break
            try:
                obj, end = self._decoder.raw_decode(text)
            except ValueError:
                if len(text) > _MAX_PENDING or not text.startswith("{"):
                    # not an object we can ever complete: skip to the next one
                    cut = text.find("\n{", 1)
                    self._pending = text[cut + 1 :] if cut > 0 else ""
                    continue
                self._pending = text
                break
            self._pending = text[end:]
            event = _event(obj)
            if event is not None:
                events.append(event)
        return events


def _event(obj: Any) -> Event | None:
    if not isinstance(obj, dict):
        return None
    source, name = obj.get("source"), obj.get("event")
    if not isinstance(source, str) or not isinstance(name, str):
        return None
    raw = obj.get("properties")
    props = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return Event(source, name, props)


class EventMonitor:
    """The pipe Cloud Hypervisor reports events on, and the events read from it."""

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        self._stream: trio.lowlevel.FdStream | None = trio.lowlevel.FdStream(read_fd)
        self._parser = EventParser()
        self._read_lock = trio.Lock()
        #: the last events seen, newest last
        self.recent: collections.deque[Event] = collections.deque(maxlen=16)
        #: the event that ended the VM, once one was seen
        self.lost: Event | None = None
        self._lost = trio.Event()

    @property
    def write_fd(self) -> int:
        """The fd to pass to ``cloud-hypervisor --event-monitor fd=N``."""
        return self._write_fd

    def close_writer(self) -> None:
        """Close husk's copy of the write end (after the spawn: the VMM holds its own)."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1

    async def wait_lost(self) -> Event | None:
        """Read events until one ends the VM (return it) or the VMM closes the pipe (None).

        Several tasks may wait: one reads, the others wait for it.
        """
        while not self._lost.is_set():
            async with self._read_lock:
                if self._lost.is_set():
                    break
                if not await self._read_some():
                    return None
        return self.lost

    async def _read_some(self) -> bool:
        stream = self._stream
        if stream is None:
            return False
        try:
            data = await stream.receive_some(_CHUNK)
        except (trio.ClosedResourceError, OSError):
            return False
        if not data:
            return False
        for event in self._parser.feed(data):
            self.recent.append(event)
            if (event.source, event.event) in VM_LOST and self.lost is None:
                self.lost = event
                self._lost.set()
        return True

    async def aclose(self) -> None:
        """Close both ends."""
        self.close_writer()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
