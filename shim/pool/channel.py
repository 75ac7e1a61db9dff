"""The pool's messages (:mod:`shim.pool.protocol`) over a trio stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from shim.pool.protocol import MAX_LINE, PoolProtocolError, decode, encode


class Channel:
    """Messages over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message."""
        await self.stream.send_all(encode(message))

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the peer has closed."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise PoolProtocolError(f"VM pool: a message longer than {MAX_LINE} bytes")
            try:
                data = await self.stream.receive_some(MAX_LINE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return decode(line)

    async def aclose(self) -> None:
        """Close the stream."""
        await self.stream.aclose()
