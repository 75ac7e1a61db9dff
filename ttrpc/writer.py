"""The one writer of a ttrpc connection.

Callers append whole frames to a shared buffer without waiting; a single task
(``run``) flushes it with ``send_all``. This is the connection's writer lock:

- a frame is appended in one synchronous step, so frames never interleave and
  stream ids reach the wire in the order they were allocated;
- a cancelled caller never leaves half a frame on the wire (only the writer
  task writes, and it is cancelled only when the whole connection goes);
- frames queued by concurrent callers leave in one system call.

A failed write closes the writer and calls ``on_failure(reason)``.

Backpressure: ``wait_writable()`` blocks while more than ``high_water`` bytes
are queued, so a peer that stops reading stalls its callers, not memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ttrpc.errors import ConnectionClosed, MessageTooLarge
from ttrpc.frame import _HEADER, MAX_MESSAGE_SIZE

log = logging.getLogger("husk.ttrpc")

_HIGH_WATER = 1 << 20


class FrameWriter:
    """Queues frames for one stream and writes them from ``run()``."""

    def __init__(
        self,
        stream: trio.abc.SendStream,
        max_size: int = MAX_MESSAGE_SIZE,
        high_water: int = _HIGH_WATER,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._stream = stream
        self._on_failure = on_failure
        self._max_size = max_size
        self._high_water = high_water
        self._buf = bytearray()
        self._data_ready = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._closed: ConnectionClosed | None = None

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the writer stopped, or None while it is open."""
        return self._closed

    def check_size(self, length: int) -> None:
        """Raise :class:`MessageTooLarge` if a payload of ``length`` cannot be sent."""
        if length > self._max_size:
            raise MessageTooLarge(length, self._max_size)

    def send_nowait(self, stream_id: int, message_type: int, flags: int, payload: bytes) -> None:
        """Queue one frame; raise if it is too large or the writer is closed."""
        if self._closed is not None:
            raise self._closed
        length = len(payload)
        if length > self._max_size:
            raise MessageTooLarge(length, self._max_size)
        buf = self._buf
        buf += _HEADER.pack(length, stream_id, message_type, flags)
        if length:
            buf += payload
        if self._data_ready:
            self._data_ready.unpark()

    async def wait_writable(self) -> None:
        """Wait until the queue is below the high-water mark.

        Not a checkpoint when there is room: the unary fast path yields once,
        when it waits for its response.
        """
        while len(self._buf) >= self._high_water and self._closed is None:
            await self._drained.park()
        if self._closed is not None:
            raise self._closed

    async def send(self, stream_id: int, message_type: int, flags: int, payload: bytes) -> None:
        """Wait for room, then queue one frame."""
        await self.wait_writable()
        self.send_nowait(stream_id, message_type, flags, payload)

    def close(self, reason: str) -> None:
        """Refuse further frames; wakes everyone waiting on the writer."""
        if self._closed is None:
            self._closed = ConnectionClosed(reason)
        self._data_ready.unpark_all()
        self._drained.unpark_all()

    async def run(self) -> None:
        """Flush queued frames until closed; write errors close the writer.

        After ``close()``, frames already queued are still flushed, so a final
        response goes out before the connection is torn down.
        """
        try:
            while True:
                if not self._buf:
                    if self._closed is not None:
                        return
                    await self._data_ready.park()
                    continue
                data, self._buf = self._buf, bytearray()
                await self._stream.send_all(data)
                if self._drained:
                    self._drained.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"write failed: {exc or type(exc).__name__}"
            log.debug("ttrpc: %s", reason)
            self.close(reason)
            if self._on_failure is not None:
                self._on_failure(reason)
        finally:
            if self._closed is None:
                self.close("writer stopped")
