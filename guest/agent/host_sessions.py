"""Host sessions on a virtio-serial port, told apart by their ttrpc stream ids.

A virtio-serial port is one byte stream. The guest learns that the host side
closed or opened its end from VIRTIO_CONSOLE_PORT_OPEN control messages, and
a read returns EOF only while the host is away *and* the agent reads. When a
host client leaves and the next one connects at once (a shim reconnecting; a
client that gave up while the VM was paused; a VM restored from a file with a
new QEMU), the guest kernel may handle "closed" and "opened" before the agent
reads again, and the agent never sees the EOF. The new client's first request
(stream id 1) then reaches the old ttrpc connection, which refuses it: "stream
id 1 cannot be reused and must increase".

The bytes themselves tell: a ttrpc client opens request streams with strictly
increasing odd ids, so a request whose id is not above the last request id
is the first frame of another client. :class:`HostSessions` reads the port,
follows the frame boundaries and ends the current session (EOF to its ttrpc
connection, whose calls are then cancelled as for any departed client) just
before that frame, which opens the next session.

What it cannot undo: answers the old connection wrote before the boundary
was seen still reach whoever is connected on the host, i.e. the new client
(which drops answers on streams it has not opened, but may take one for its
own request with the same id), and a frame cut short by a client that died
mid-write desynchronises the stream until the port is reopened.
"""

from __future__ import annotations

import logging

import trio

from ttrpc import HEADER_SIZE, MessageType, decode_header

log = logging.getLogger("husk.agent.channel")

_RECEIVE_CHUNK = 64 * 1024


class HostSessions:
    """Splits one port's bytes into host sessions at ttrpc request frames."""

    def __init__(self, port: trio.abc.Stream) -> None:
        self._port = port
        self._buffer = bytearray()
        self._pass = 0
        """Bytes of the current frame (header and payload) not yet passed on."""
        self._last_request = 0
        self._session = 0
        self.host_reconnected = False
        """The current session ended because a new client started; call ``next``."""
        self.ended = False
        """The port read EOF (the host side is closed) or failed."""

    def next(self) -> HostSession:
        """The stream of the next host session (the first one, at the start)."""
        self._session += 1
        self._last_request = 0
        self.host_reconnected = False
        return HostSession(self, self._session)

    async def receive(self, session: int, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` of ``session``'s bytes; ``b""`` once it has ended."""
        limit = max_bytes or _RECEIVE_CHUNK
        while session == self._session and not self.host_reconnected:
            taken = self._take(limit)
            if taken:
                return taken
            if self.ended or self.host_reconnected:
                break
            await self._fill()
        return b""

    def _take(self, limit: int) -> bytes:
        """Cut whole or partial frames of the current session out of the buffer."""
        buffer, end = self._buffer, 0
        while end < limit:
            if self._pass:
                step = min(self._pass, len(buffer) - end, limit - end)
                if not step:
                    break
                end += step
                self._pass -= step
                continue
            if len(buffer) - end < HEADER_SIZE:
                break
            length, stream_id, message_type, _ = decode_header(buffer, end)
            if message_type == MessageType.REQUEST:
                if stream_id <= self._last_request:
                    log.info(
                        "virtio-serial: request on stream %d after stream %d: "
                        "a new host connection; ending the previous session",
                        stream_id,
                        self._last_request,
                    )
                    self.host_reconnected = True
                    break
                self._last_request = stream_id
            self._pass = HEADER_SIZE + length
        taken = bytes(buffer[:end])
        del buffer[:end]
        return taken

    async def _fill(self) -> None:
        try:
            data = await self._port.receive_some(_RECEIVE_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended = True
            raise
        if not data:
            self.ended = True
        self._buffer += data

    async def send_all(self, session: int, data: bytes) -> None:
        if session != self._session:
            raise trio.ClosedResourceError("this host session has ended")
        await self._port.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._port.wait_send_all_might_not_block()


class HostSession(trio.abc.Stream):
    """One host client's view of the port; closing it leaves the port open."""

    def __init__(self, sessions: HostSessions, number: int) -> None:
        self._sessions = sessions
        self._number = number
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the host session is closed")
        return await self._sessions.receive(self._number, max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the host session is closed")
        await self._sessions.send_all(self._number, bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self._sessions.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()
