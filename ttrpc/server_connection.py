"""One accepted ttrpc connection: reads requests, runs handlers, answers.

Every call runs in a task of the connection's nursery (unary calls on reused
worker tasks, see ``workers``), so a slow call never blocks the others. When
the client goes away, its running calls are cancelled (containerd cancels
their contexts the same way); on ``drain()`` they are left to finish.
Hostile input is answered, skipped or ends this connection alone, each
with a logged reason:

====================================  ==========================================
oversize frame                        payload skipped; RESOURCE_EXHAUSTED on its stream
truncated frame                       connection closed
garbage Request protobuf              INVALID_ARGUMENT on its stream
even or reused stream id              INVALID_ARGUMENT on its stream
unknown service / method              UNIMPLEMENTED naming it
data for an unknown stream            INVALID_ARGUMENT on its stream
response or unknown message type      ignored (as containerd does, for future types)
====================================  ==========================================
"""

from __future__ import annotations

import logging
import math

import trio
from google.protobuf.message import Message

from agent_proto import status_pb2, ttrpc_pb2
from ttrpc.codes import Code
from ttrpc.envelope import encode_ok_response
from ttrpc.errors import (
    ConnectionClosed,
    FrameTooLarge,
    InvalidPayload,
    RpcError,
    TruncatedFrame,
    UnknownMethod,
)
from ttrpc.frame import DISPATCH_BURST, Flags, Frame, FrameReader, MessageType
from ttrpc.service import CallContext, MethodSpec, ServiceRegistry
from ttrpc.status import code_and_message
from ttrpc.stream import ServerStream, decode
from ttrpc.workers import WorkerPool
from ttrpc.writer import FrameWriter

log = logging.getLogger("husk.ttrpc")

_STREAM_END = Flags.REMOTE_CLOSED | Flags.NO_DATA


class ServerConnection:
    """Serves one stream until the peer leaves, breaks the protocol or shutdown."""

    def __init__(
        self, registry: ServiceRegistry, stream: trio.abc.Stream, max_message_size: int
    ) -> None:
        self._registry = registry
        self._stream = stream
        self._reader = FrameReader(stream, max_message_size)
        self._writer = FrameWriter(stream, max_message_size)
        self._streams: dict[int, ServerStream] = {}
        self._active = 0
        self._last_stream_id = 0
        self._draining = False
        self._scope = trio.CancelScope()
        self._read_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._workers: WorkerPool | None = None

    @property
    def active_calls(self) -> int:
        """Calls started and not yet answered."""
        return self._active

    async def run(self) -> None:
        """Serve until done; never raises for anything the peer does."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._workers = WorkerPool(nursery)
                    nursery.start_soon(self._writer.run)
                    with self._read_scope:
                        reason = await self._read_loop()
                        self._log_end(reason)
                        nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(self._stream)

    def drain(self) -> None:
        """Refuse new calls, finish running ones, then close."""
        self._draining = True
        self._close_if_idle()

    def abort(self) -> None:
        """Cancel every running call and close now."""
        self._scope.cancel()

    # -- reading --------------------------------------------------------------

    async def _read_loop(self) -> str:
        """Dispatch frames until the connection ends; return why it ended."""
        reader = self._reader
        burst = 0
        while True:
            await self._writer.wait_writable()
            try:
                frame = await reader.receive()
            except FrameTooLarge as exc:
                log.warning("ttrpc: %s; payload skipped", exc)
                self._reject_stream(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                continue
            except TruncatedFrame as exc:
                return f"protocol error: {exc}"
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return f"connection lost: {exc or type(exc).__name__}"
            if frame is None:
                return ""
            message_type = frame.message_type
            if message_type == MessageType.REQUEST:
                self._on_request(frame)
                burst += 1
                if burst == DISPATCH_BURST:
                    burst = 0
                    if reader.buffered:  # more to dispatch: let the woken tasks answer first
                        await trio.lowlevel.cancel_shielded_checkpoint()
            elif message_type == MessageType.DATA:
                await self._on_data(frame)
            else:
                log.warning(
                    "ttrpc: ignoring message type %d on stream %d from a client",
                    message_type,
                    frame.stream_id,
                )

    def _log_end(self, reason: str) -> None:
        if not reason:
            log.debug("ttrpc: client closed the connection")
        elif reason.startswith("protocol error"):
            log.warning("ttrpc: closing connection: %s", reason)
        else:
            log.info("ttrpc: closing connection: %s", reason)

    def _on_request(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == 0:
            log.warning("ttrpc: request on even stream id %d refused", stream_id)
            self._answer(
                stream_id,
                Code.INVALID_ARGUMENT,
                "stream id must be odd for client-initiated streams",
            )
            return
        if stream_id <= self._last_stream_id:
            log.warning("ttrpc: request reusing stream id %d refused", stream_id)
            self._answer(
                stream_id,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} cannot be reused and must increase",
            )
            return
        self._last_stream_id = stream_id
        if self._draining:
            self._answer(stream_id, Code.UNAVAILABLE, "ttrpc server is shutting down")
            return
        try:
            request = decode(ttrpc_pb2.Request, frame.payload)
            spec = self._registry.lookup(request.service, request.method)
        except (InvalidPayload, UnknownMethod) as exc:
            log.info("ttrpc: stream %d refused: %s", stream_id, exc)
            self._answer(stream_id, exc.code, str(exc))
            return
        assert self._nursery is not None and self._workers is not None
        self._active += 1
        context = _call_context(request)
        if spec.is_unary:
            self._workers.submit(self._serve_unary, stream_id, spec, context, request.payload)
        else:
            stream = ServerStream(spec, context, self._writer, stream_id)
            if request.payload or not spec.client_streaming:
                stream.inbox.put_nowait(request.payload)
            if not spec.client_streaming or not frame.flags & Flags.REMOTE_OPEN:
                stream.inbox.close()
            self._streams[stream_id] = stream
            self._nursery.start_soon(self._serve_stream, stream_id, spec, stream)

    async def _on_data(self, frame: Frame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            log.warning("ttrpc: data for inactive stream %d", frame.stream_id)
            self._answer(
                frame.stream_id, Code.INVALID_ARGUMENT, f"stream {frame.stream_id} is not active"
            )
            return
        if not frame.flags & Flags.NO_DATA:
            await stream.inbox.put(frame.payload)
        if frame.flags & Flags.REMOTE_CLOSED:
            stream.inbox.close()

    def _reject_stream(self, stream_id: int, code: Code, message: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.inbox.close(RpcError(code, message))
        else:
            self._answer(stream_id, code, message)

    # -- calls ----------------------------------------------------------------

    async def _serve_unary(
        self, stream_id: int, spec: MethodSpec, context: CallContext, payload: bytes
    ) -> None:
        try:
            request = decode(spec.request_type, payload)
            if context.deadline == math.inf:
                # the common case; a CancelScope per call costs ~3 us for nothing
                response = await spec.handler(request, context)
            else:
                with trio.CancelScope(deadline=context.deadline) as scope:
                    response = await spec.handler(request, context)
                if scope.cancelled_caught:
                    raise trio.TooSlowError(f"{spec.service}/{spec.name} exceeded its deadline")
            body = _encode_result(spec, response)
        except Exception as exc:
            self._answer_exception(stream_id, spec, exc)
        else:
            self._respond(stream_id, body)
        finally:
            self._call_done()

    async def _serve_stream(self, stream_id: int, spec: MethodSpec, stream: ServerStream) -> None:
        try:
            with trio.CancelScope(deadline=stream.context.deadline) as scope:
                if spec.client_streaming:
                    result = await spec.handler(stream)
                else:
                    result = await spec.handler(await stream.recv(), stream)
            if scope.cancelled_caught:
                raise trio.TooSlowError(f"{spec.service}/{spec.name} exceeded its deadline")
            if not spec.server_streaming:
                body = _encode_result(spec, result)
        except Exception as exc:
            self._answer_exception(stream_id, spec, exc)
        else:
            if spec.server_streaming:
                self._send(stream_id, MessageType.DATA, _STREAM_END, b"")
            else:
                self._respond(stream_id, body)
        finally:
            self._streams.pop(stream_id, None)
            stream.inbox.close()
            self._call_done()

    def _call_done(self) -> None:
        self._active -= 1
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._draining and self._active == 0:
            self._read_scope.cancel()
            self._writer.close("ttrpc server shut down")
            if self._workers is not None:
                self._workers.close()

    # -- answering ------------------------------------------------------------

    def _answer_exception(self, stream_id: int, spec: MethodSpec, exc: Exception) -> None:
        code, message = code_and_message(exc)
        if code is Code.INTERNAL:
            log.error("ttrpc: %s/%s failed", spec.service, spec.name, exc_info=exc)
        else:
            log.debug("ttrpc: %s/%s: %s %s", spec.service, spec.name, code.name, message)
        self._answer(stream_id, code, message)

    def _answer(self, stream_id: int, code: Code, message: str) -> None:
        status = status_pb2.Status(code=int(code), message=message)
        body = ttrpc_pb2.Response(status=status).SerializeToString()
        self._send(stream_id, MessageType.RESPONSE, 0, body)

    def _respond(self, stream_id: int, payload: bytes) -> None:
        body = encode_ok_response(payload)
        try:
            self._writer.check_size(len(body))
        except RpcError as exc:
            log.error("ttrpc: response on stream %d not sent: %s", stream_id, exc)
            self._answer(stream_id, exc.code, exc.message)
            return
        self._send(stream_id, MessageType.RESPONSE, 0, body)

    def _send(self, stream_id: int, message_type: int, flags: int, body: bytes) -> None:
        try:
            self._writer.send_nowait(stream_id, message_type, flags, body)
        except ConnectionClosed as exc:
            log.debug("ttrpc: answer on stream %d dropped: %s", stream_id, exc.reason)


def _call_context(request: ttrpc_pb2.Request) -> CallContext:
    metadata: dict[str, list[str]] = {}
    if request.metadata:  # usually empty; iterating costs even then
        for pair in request.metadata:
            metadata.setdefault(pair.key, []).append(pair.value)
    timeout = request.timeout_nano
    deadline = trio.current_time() + timeout / 1e9 if timeout else math.inf
    return CallContext(request.service, request.method, metadata, deadline)


def _encode_result(spec: MethodSpec, result: object) -> bytes:
    if not isinstance(result, spec.response_type):
        raise TypeError(
            f"{spec.service}/{spec.name} returned {type(result).__name__}, "
            f"expected {spec.response_type.DESCRIPTOR.full_name}"
        )
    assert isinstance(result, Message)
    return result.SerializeToString()
