"""The debug console's framing: a shell in the guest, ``husk exec`` on the host.

The channel (a virtio-serial port, or a vsock port where there is vsock) is
one byte stream; frames let it carry a terminal's window size and the shell's
exit next to its bytes::

    magic 0xC5 | kind (1 byte) | payload length (2 bytes, big endian) | payload

host → guest: ``OPEN`` (rows, columns, TERM) starts a shell on a new pty,
replacing any shell still there; ``INPUT`` is typed bytes; ``RESIZE`` (rows,
columns) sets the pty's size; ``CLOSE`` hangs the shell up.
guest → host: ``STARTED`` once the shell runs; ``OUTPUT`` is the pty's bytes;
``EXITED`` (a signed 32-bit status) when the shell has ended.

Both sides read what the other sends as untrusted: a bad magic, an unknown
kind or a short size payload is a :class:`ConsoleProtocolError`, and payloads
are at most 65535 bytes by construction.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from common.errors import HuskError

MAGIC = 0xC5
HEADER = struct.Struct(">BBH")
MAX_PAYLOAD = 0xFFFF
#: the virtio-serial port the guest's shell listens on, and the vsock port
SERIAL_PORT_NAME = "console.channel.0"
VSOCK_PORT = 1026
#: kernel command-line switch that makes the guest agent serve the console
CMDLINE_SWITCH = "husk.debug_console"

OPEN, INPUT, RESIZE, CLOSE, STARTED, OUTPUT, EXITED = range(1, 8)
KINDS = frozenset(range(1, 8))
_SIZE = struct.Struct(">HH")
_STATUS = struct.Struct(">i")
_TERM_MAX = 64


class ConsoleProtocolError(HuskError):
    """The other end sent something that is not a debug console frame."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    kind: int
    payload: bytes = b""


def encode(kind: int, payload: bytes = b"") -> bytes:
    """One frame (payloads longer than 65535 bytes must be split by the caller)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a console frame carries at most {MAX_PAYLOAD} bytes")
    return HEADER.pack(MAGIC, kind, len(payload)) + payload


def encode_data(kind: int, data: bytes) -> bytes:
    """``INPUT`` or ``OUTPUT`` frames for any amount of ``data``."""
    return b"".join(
        encode(kind, data[i : i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD)
    )


def encode_open(rows: int, columns: int, term: str) -> bytes:
    """``OPEN``: the host terminal's size and its TERM."""
    return encode(OPEN, _SIZE.pack(rows, columns) + term.encode("ascii", "ignore")[:_TERM_MAX])


def encode_resize(rows: int, columns: int) -> bytes:
    """``RESIZE``: the host terminal's new size."""
    return encode(RESIZE, _SIZE.pack(rows, columns))


def encode_exited(status: int) -> bytes:
    """``EXITED``: the shell's exit code (or 128 + signal)."""
    return encode(EXITED, _STATUS.pack(status))


def size_of(frame: Frame) -> tuple[int, int]:
    """(rows, columns) of an ``OPEN`` or ``RESIZE`` frame."""
    if len(frame.payload) < _SIZE.size:
        raise ConsoleProtocolError("a console size frame is too short")
    rows, columns = _SIZE.unpack_from(frame.payload)
    return rows, columns


def term_of(frame: Frame) -> str:
    """The TERM an ``OPEN`` frame names ("" if none), printable ASCII only."""
    raw = frame.payload[_SIZE.size :][:_TERM_MAX]
    return "".join(c for c in raw.decode("ascii", "ignore") if c.isalnum() or c in "-_.+")


def status_of(frame: Frame) -> int:
    """The status of an ``EXITED`` frame."""
    if len(frame.payload) != _STATUS.size:
        raise ConsoleProtocolError("a console exit frame has the wrong size")
    status: int = _STATUS.unpack(frame.payload)[0]
    return status


class Decoder:
    """Turns received bytes into frames; keeps a partial frame between calls."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            magic, kind, length = HEADER.unpack_from(self._buffer)
            if magic != MAGIC or kind not in KINDS:
                self._buffer.clear()
                raise ConsoleProtocolError(
                    f"not a debug console frame (magic {magic:#x}, kind {kind})"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(Frame(kind, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames

    def reset(self) -> None:
        """Drop a partial frame (the peer went away mid-frame)."""
        self._buffer.clear()
