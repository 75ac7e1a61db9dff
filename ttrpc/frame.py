"""ttrpc message frames: the 10-byte header and a buffered frame reader.

A frame is a header followed by ``length`` payload bytes::

    length u32 BE | stream id u32 BE | type u8 | flags u8 | payload

The reader pulls large chunks with ``receive_some`` and cuts frames out of one
bytearray, so a burst of small frames costs one system call, not two per frame.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import trio

from ttrpc.errors import FrameTooLarge, TruncatedFrame

HEADER_SIZE = 10
MAX_MESSAGE_SIZE = 4 << 20
"""The largest payload either side sends or accepts (containerd's messageLengthMax)."""

DISPATCH_BURST = 4
"""Frames a reader dispatches before it yields to the tasks it woke.

Without the yield, a reader that finds 16 requests (or responses) in one
chunk wakes all 16 handlers (callers) before any of them runs, so every answer
leaves in one write and the peer idles until then: client and server take
turns instead of working at once. Yielding every few frames lets the first
answers go out while the rest are still being handled, and the two processes
overlap. A reader yields only while more frames are already buffered.
4 measured best on two idle cores (2, 8 and no yield were slower); on one
busy core the extra writes cost ~20%, which the two-core gain (~+60%) outweighs.
"""

_HEADER = struct.Struct(">IIBB")
_RECEIVE_CHUNK = 64 * 1024


class MessageType(enum.IntEnum):
    """The frame's message type byte."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """Frame flags; their meaning depends on the message type."""

    REMOTE_CLOSED = 0x1
    """The sender will send no more data on this stream."""
    REMOTE_OPEN = 0x2
    """(request) The sender will follow with data frames."""
    NO_DATA = 0x4
    """(data) The frame carries no message, only flags."""


class FrameHeader(NamedTuple):
    """A decoded frame header."""

    length: int
    stream_id: int
    message_type: int
    flags: int


class Frame(NamedTuple):
    """A complete frame as read from the wire.

    ``message_type`` stays a plain int: an unknown type is the receiver's
    decision, not a decoding failure.
    """

    stream_id: int
    message_type: int
    flags: int
    payload: bytes


def encode_header(length: int, stream_id: int, message_type: int, flags: int = 0) -> bytes:
    """Return the 10-byte header for a frame."""
    return _HEADER.pack(length, stream_id, message_type, flags)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> FrameHeader:
    """Decode the 10 bytes of ``data`` at ``offset`` into a header."""
    return FrameHeader._make(_HEADER.unpack_from(data, offset))


class FrameReader:
    """Reads frames from a trio stream through one growing buffer.

    ``receive()`` returns the next frame, or None when the stream ends cleanly
    between frames. An oversize frame raises :class:`FrameTooLarge` after its
    header; its payload is skipped on the next call, so reading can go on.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._stream = stream
        self._max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0

    async def receive(self) -> Frame | None:
        """Return the next frame, or None at a clean end of stream."""
        if self._skip:
            await self._discard()
        while True:
            buf = self._buf
            available = len(buf) - self._pos
            if available >= HEADER_SIZE:
                length, stream_id, message_type, flags = _HEADER.unpack_from(buf, self._pos)
                if length > self._max_size:
                    self._pos += HEADER_SIZE
                    self._skip = length
                    raise FrameTooLarge(stream_id, message_type, length, self._max_size)
                end = self._pos + HEADER_SIZE + length
                if end <= len(buf):
                    start = self._pos + HEADER_SIZE
                    with memoryview(buf) as view:
                        payload = bytes(view[start:end])
                    self._consume_to(end)
                    return Frame(stream_id, message_type, flags, payload)
                needed = end - len(buf)
            else:
                needed = HEADER_SIZE - available
            if not await self._fill(needed):
                if len(self._buf) == self._pos:
                    return None
                raise TruncatedFrame(
                    f"stream ended inside a frame ({len(self._buf) - self._pos} bytes pending)"
                )

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def _consume_to(self, end: int) -> None:
        if end == len(self._buf):
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = end

    async def _fill(self, needed: int) -> bool:
        """Read at least one chunk; False at end of stream."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        chunk = await self._stream.receive_some(max(needed, _RECEIVE_CHUNK))
        if not chunk:
            return False
        self._buf += chunk
        return True

    async def _discard(self) -> None:
        while self._skip:
            available = len(self._buf) - self._pos
            if available:
                step = min(available, self._skip)
                self._skip -= step
                self._consume_to(self._pos + step)
                continue
            self._buf.clear()
            self._pos = 0
            chunk = await self._stream.receive_some(min(self._skip, 1 << 20))
            if not chunk:
                raise TruncatedFrame(
                    f"stream ended while skipping an oversize frame ({self._skip} bytes left)"
                )
            self._buf += chunk
