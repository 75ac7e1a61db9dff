"""The ttrpc client: concurrent calls multiplexed over one trio stream.

    async with Client.open(stream) as client:
        resp = await client.call("containerd.task.v2.Task", "State",
                                 task_pb2.StateRequest(id="c1"), task_pb2.StateResponse,
                                 timeout=5)
        task = client.stub(task_pb2.DESCRIPTOR.services_by_name["Task"])
        resp = await task.State(task_pb2.StateRequest(id="c1"))

The context manager owns the background reader and writer. The client never
reconnects: when the connection breaks, every pending and later call raises
:class:`ConnectionClosed` (an ``RpcError`` with code UNAVAILABLE) naming why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from agent_proto import ttrpc_pb2
from ttrpc.codes import Code
from ttrpc.envelope import encode_request, ok_response_payload
from ttrpc.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    FrameTooLarge,
    ProtocolError,
    RpcError,
    TruncatedFrame,
)
from ttrpc.frame import (
    DISPATCH_BURST,
    MAX_MESSAGE_SIZE,
    Flags,
    Frame,
    FrameReader,
    MessageType,
)
from ttrpc.status import error_from_status
from ttrpc.stream import ClientStream, decode
from ttrpc.writer import FrameWriter

log = logging.getLogger("husk.ttrpc")

M = TypeVar("M", bound=Message)
Metadata = Mapping[str, str | Sequence[str]]

_MAX_STREAM_ID = 0xFFFFFFFF


class _UnaryCall:
    """A unary call parked until its one response frame (or a failure) arrives.

    The reader hands the outcome straight to the parked task with
    ``trio.lowlevel.reschedule``: no Event, no channel, one wake-up per call.
    """

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task

    def resolve(self, result: outcome.Outcome[Frame]) -> None:
        """Wake the caller with ``result`` (the caller is parked, never twice)."""
        trio.lowlevel.reschedule(self.task, result)


class Client:
    """A ttrpc client over one connected stream; make it with :meth:`open`."""

    def __init__(self, stream: trio.abc.Stream, *, max_message_size: int = MAX_MESSAGE_SIZE):
        self._stream = stream
        self._reader = FrameReader(stream, max_message_size)
        self._writer = FrameWriter(stream, max_message_size, on_failure=self._close)
        self._pending: dict[int, _UnaryCall | ClientStream[Any]] = {}
        self._next_stream_id = 1
        self._closed: ConnectionClosed | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, stream: trio.abc.Stream, *, max_message_size: int = MAX_MESSAGE_SIZE
    ) -> AsyncIterator[Client]:
        """Run a client on ``stream`` for the body of the ``async with``.

        Leaving the block fails any call still pending and closes the stream.
        """
        client = cls(stream, max_message_size=max_message_size)
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._writer.run)
                nursery.start_soon(client._read_loop)
                try:
                    yield client
                except GeneratorExit:
                    raise
                except BaseException as exc:
                    # re-raised below, outside the nursery, so the caller sees
                    # its own exception rather than an ExceptionGroup around it
                    body_error = exc
                finally:
                    client._close("client closed")
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)
        if body_error is not None:
            raise body_error

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection ended, or None while it is usable."""
        return self._closed

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """Make a unary call and return its response.

        ``timeout`` (seconds) is sent to the server and enforced here, raising
        :class:`DeadlineExceeded`; an enclosing trio deadline is sent too.
        A non-OK status raises :class:`RpcError` carrying its code.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        deadline, body = self._envelope(service, method, request, timeout, metadata)
        if deadline == math.inf:
            # no local deadline: an enclosing scope still cancels the wait, and
            # a CancelScope per call would cost as much as the rest of the call
            frame = await self._round_trip(body)
        else:
            with trio.CancelScope(deadline=deadline) as scope:
                frame = await self._round_trip(body)
            if scope.cancelled_caught:
                raise DeadlineExceeded(f"{service}/{method} did not answer within {timeout}s")
        return _unary_result(frame, response_type)

    @asynccontextmanager
    async def open_stream(
        self,
        service: str,
        method: str,
        response_type: type[M],
        *,
        client_streaming: bool,
        server_streaming: bool,
        request: Message | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[ClientStream[M]]:
        """Open a streaming call for the body of the ``async with``.

        ``request`` is the single request of a server-streaming call; a
        client-streaming call sends with ``stream.send`` and ends with
        ``stream.close_send()``. ``timeout`` bounds the whole block.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        deadline, body = self._envelope(service, method, request, timeout, metadata)
        flags = Flags.REMOTE_OPEN if client_streaming else Flags.REMOTE_CLOSED
        with trio.CancelScope(deadline=deadline) as scope:
            await self._writer.wait_writable()
            stream_id = self._allocate_stream_id()
            stream = ClientStream(
                self._writer, stream_id, response_type, client_streaming, server_streaming
            )
            self._pending[stream_id] = stream
            try:
                self._writer.send_nowait(stream_id, MessageType.REQUEST, flags, body)
                yield stream
            finally:
                self._pending.pop(stream_id, None)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"{service}/{method} did not finish within {timeout}s")

    def stub(self, descriptor: ServiceDescriptor) -> Stub:
        """Return an object whose attributes call ``descriptor``'s RPCs by name."""
        return Stub(self, descriptor)

    async def aclose(self) -> None:
        """Fail pending calls and close the stream (``open`` does this on exit)."""
        self._close("client closed")
        await trio.aclose_forcefully(self._stream)

    # -- internals ------------------------------------------------------------

    async def _round_trip(self, body: bytes) -> Frame:
        """Send one request and park until its response frame; raise on failure."""
        await self._writer.wait_writable()
        stream_id = self._allocate_stream_id()
        pending = self._pending
        pending[stream_id] = _UnaryCall(trio.lowlevel.current_task())
        try:
            self._writer.send_nowait(stream_id, MessageType.REQUEST, 0, body)
        except BaseException:
            del pending[stream_id]
            raise

        def abort(_: Any) -> trio.lowlevel.Abort:
            # cancelled while parked: forget the call now, so the reader can
            # never wake a task that is already being woken with Cancelled
            pending.pop(stream_id, None)
            return trio.lowlevel.Abort.SUCCEEDED

        frame: Frame = await trio.lowlevel.wait_task_rescheduled(abort)
        return frame

    def _envelope(
        self,
        service: str,
        method: str,
        request: Message | None,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> tuple[float, bytes]:
        """Return the call's local deadline and its encoded Request."""
        if self._closed is not None:
            raise self._closed
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        sent_deadline = min(deadline, trio.current_effective_deadline())
        payload = b"" if request is None else request.SerializeToString()
        timeout_nano = 0
        if sent_deadline != math.inf:
            # -inf (already cancelled) or past: the smallest timeout there is
            remaining = max(sent_deadline - trio.current_time(), 1e-9)
            timeout_nano = max(1, int(remaining * 1e9))
        pairs: list[tuple[str, str]] = []
        if metadata:
            for key, values in metadata.items():
                for value in [values] if isinstance(values, str) else values:
                    pairs.append((key, value))
        body = encode_request(service, method, payload, timeout_nano, pairs)
        self._writer.check_size(len(body))
        return deadline, body

    def _allocate_stream_id(self) -> int:
        if self._closed is not None:
            raise self._closed
        stream_id = self._next_stream_id
        if stream_id > _MAX_STREAM_ID:
            self._close("stream ids exhausted; open a new connection")
            raise self._closed_error()
        self._next_stream_id = stream_id + 2
        return stream_id

    def _closed_error(self) -> ConnectionClosed:
        assert self._closed is not None
        return self._closed

    async def _read_loop(self) -> None:
        reason = "reader stopped"
        try:
            reason = await self._dispatch_frames()
        except TruncatedFrame as exc:
            reason = f"protocol error: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"connection lost: {exc or type(exc).__name__}"
        finally:
            if self._closed is None and reason.startswith("protocol error"):
                log.warning("ttrpc: client connection closed: %s", reason)
            self._close(reason)

    async def _dispatch_frames(self) -> str:
        pending = self._pending
        burst = 0
        while True:
            try:
                frame = await self._reader.receive()
            except FrameTooLarge as exc:
                log.warning("ttrpc: %s; payload skipped", exc)
                self._fail_stream(exc.stream_id, RpcError(Code.RESOURCE_EXHAUSTED, str(exc)))
                continue
            if frame is None:
                return "server closed the connection"
            target = pending.get(frame.stream_id)
            if target is None:
                self._log_stray(frame)
            elif type(target) is _UnaryCall:
                del pending[frame.stream_id]
                target.resolve(outcome.Value(frame))
                burst += 1
                if burst == DISPATCH_BURST:
                    burst = 0
                    if self._reader.buffered:  # more to dispatch: let the woken tasks answer first
                        await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                assert isinstance(target, ClientStream)
                await target.inbox.put(frame)

    def _log_stray(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == 1 and stream_id < self._next_stream_id:
            log.debug("ttrpc: dropped late message for finished stream %d", stream_id)
        else:
            log.warning(
                "ttrpc: ignoring message type %d for unknown stream %d",
                frame.message_type,
                stream_id,
            )

    def _fail_stream(self, stream_id: int, error: RpcError) -> None:
        target = self._pending.pop(stream_id, None)
        if type(target) is _UnaryCall:
            target.resolve(outcome.Error(error))
        elif isinstance(target, ClientStream):
            target.inbox.close(error)

    def _close(self, reason: str) -> None:
        if self._closed is not None:
            return
        error = self._closed = ConnectionClosed(reason)
        self._writer.close(reason)
        for stream_id in list(self._pending):
            self._fail_stream(stream_id, error)


def _unary_result(frame: Frame, response_type: type[M]) -> M:
    if frame.message_type != MessageType.RESPONSE:
        raise ProtocolError(f"unexpected message type {frame.message_type} for a unary call")
    payload = ok_response_payload(frame.payload)
    if payload is None:  # an error, or a shape the fast path leaves to protobuf
        response = decode(ttrpc_pb2.Response, frame.payload)
        error = error_from_status(response.status)
        if error is not None:
            raise error
        payload = response.payload
    return decode(response_type, payload)


class Stub:
    """Calls a service's RPCs as attributes named like them.

    Unary RPCs are coroutines ``await stub.Name(request, timeout=..., metadata=...)``;
    streaming RPCs return ``client.open_stream(...)`` context managers:
    ``async with stub.Watch(request) as stream``.
    """

    def __init__(self, client: Client, descriptor: ServiceDescriptor) -> None:
        self._client = client
        self._service = descriptor.full_name
        for method in descriptor.methods:
            setattr(self, method.name, self._bind(method))

    def _bind(self, method: MethodDescriptor) -> Any:
        client, service, name = self._client, self._service, method.name
        response_type = GetMessageClass(method.output_type)
        if not (method.client_streaming or method.server_streaming):

            async def unary(request: Message, **options: Any) -> Message:
                return await client.call(service, name, request, response_type, **options)

            unary.__name__ = name
            return unary

        def streaming(
            request: Message | None = None, **options: Any
        ) -> AbstractAsyncContextManager[ClientStream[Message]]:
            return client.open_stream(
                service,
                name,
                response_type,
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
                request=request,
                **options,
            )

        streaming.__name__ = name
        return streaming

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"service {self._service} has no method {name}")
