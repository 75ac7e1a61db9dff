"""Streaming calls (ttrpc 1.2): the per-stream inbox and both ends of a stream.

ttrpc has no flow control. As in containerd's implementation, each stream
buffers up to ``STREAM_BUFFER`` incoming messages; when the consumer falls
further behind, the connection's reader waits up to ``STREAM_FULL_TIMEOUT``
for room and then fails that one stream with RESOURCE_EXHAUSTED.

Both ends raise ``trio.EndOfChannel`` from ``recv()`` when the peer has
finished sending, and support ``async for``.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from agent_proto import ttrpc_pb2
from ttrpc.codes import Code
from ttrpc.errors import InvalidPayload, ProtocolError, RpcError
from ttrpc.frame import Flags, Frame, MessageType
from ttrpc.service import CallContext, MethodSpec
from ttrpc.status import error_from_status
from ttrpc.writer import FrameWriter

STREAM_BUFFER = 64
STREAM_FULL_TIMEOUT = 5.0

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class Inbox(Generic[T]):
    """A bounded queue from the connection's reader to one stream's consumer."""

    def __init__(self, size: int = STREAM_BUFFER) -> None:
        self._items: deque[T] = deque()
        self._size = size
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()
        self._closed = False
        self._error: BaseException | None = None

    async def put(self, item: T, timeout: float = STREAM_FULL_TIMEOUT) -> None:
        """Queue ``item``; fail the inbox if the consumer makes no room in time."""
        if self._closed:
            return
        if len(self._items) >= self._size:
            with trio.move_on_after(timeout):
                while len(self._items) >= self._size and not self._closed:
                    await self._writable.park()
            if self._closed:
                return
            if len(self._items) >= self._size:
                self.close(RpcError(Code.RESOURCE_EXHAUSTED, "stream receive buffer is full"))
                return
        self._items.append(item)
        self._readable.unpark()

    def put_nowait(self, item: T) -> None:
        """Queue ``item`` regardless of the bound (for a stream's first message)."""
        if not self._closed:
            self._items.append(item)
            self._readable.unpark()

    def close(self, error: BaseException | None = None) -> None:
        """No more items; ``get()`` drains what is queued, then raises ``error``."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        if error is not None:
            self._items.clear()
        self._readable.unpark_all()
        self._writable.unpark_all()

    async def get(self) -> T:
        """Return the next item; at the end raise the close error or EndOfChannel."""
        while not self._items:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise trio.EndOfChannel
            await self._readable.park()
        item = self._items.popleft()
        self._writable.unpark()
        return item


def decode(message_type: type[M], payload: bytes) -> M:
    """Parse ``payload``; raise :class:`InvalidPayload` when it does not decode."""
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidPayload(f"cannot decode {message_type.DESCRIPTOR.full_name}: {exc}") from None
    return message


class ServerStream:
    """The server's end of a streaming call, handed to streaming handlers."""

    def __init__(
        self, spec: MethodSpec, context: CallContext, writer: FrameWriter, stream_id: int
    ) -> None:
        self.context = context
        self._spec = spec
        self._writer = writer
        self._stream_id = stream_id
        self.inbox: Inbox[bytes] = Inbox()

    async def recv(self) -> Message:
        """Return the client's next message; EndOfChannel when it has closed."""
        return decode(self._spec.request_type, await self.inbox.get())

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def send(self, message: Message) -> None:
        """Send one message to the client (server-streaming methods only)."""
        if not self._spec.server_streaming:
            raise ProtocolError(f"{self._spec.name} does not stream responses; return one")
        await self._writer.send(self._stream_id, MessageType.DATA, 0, message.SerializeToString())


class ClientStream(Generic[M]):
    """The client's end of a streaming call; see ``Client.open_stream``."""

    def __init__(
        self,
        writer: FrameWriter,
        stream_id: int,
        response_type: type[M],
        client_streaming: bool,
        server_streaming: bool,
    ) -> None:
        self._writer = writer
        self.stream_id = stream_id
        self._response_type = response_type
        self._client_streaming = client_streaming
        self._server_streaming = server_streaming
        self._local_closed = not client_streaming
        self.finished = False
        self.inbox: Inbox[Frame] = Inbox()

    async def send(self, message: Message) -> None:
        """Send one message to the server (client-streaming methods only)."""
        if self._local_closed:
            raise ProtocolError("cannot send on a stream whose sending side is closed")
        await self._writer.send(self.stream_id, MessageType.DATA, 0, message.SerializeToString())

    async def close_send(self) -> None:
        """Tell the server no more messages follow."""
        if self._local_closed:
            return
        self._local_closed = True
        await self._writer.send(
            self.stream_id, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b""
        )

    async def recv(self) -> M:
        """Return the server's next message; EndOfChannel once it has finished.

        A non-OK status from the server raises :class:`RpcError`.
        """
        while not self.finished:
            frame = await self.inbox.get()
            if frame.message_type == MessageType.RESPONSE:
                self.finished = True
                response = decode(ttrpc_pb2.Response, frame.payload)
                error = error_from_status(response.status)
                if error is not None:
                    raise error
                if self._server_streaming and not response.payload:
                    break
                return decode(self._response_type, response.payload)
            if frame.message_type != MessageType.DATA or not self._server_streaming:
                self.finished = True
                raise ProtocolError(f"unexpected message type {frame.message_type} on a stream")
            if frame.flags & Flags.REMOTE_CLOSED:
                self.finished = True
            if not frame.flags & Flags.NO_DATA:
                return decode(self._response_type, frame.payload)
        raise trio.EndOfChannel

    def __aiter__(self) -> ClientStream[M]:
        return self

    async def __anext__(self) -> M:
        try:
            return await self.recv()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
