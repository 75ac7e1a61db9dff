"""Shared pieces for the ttrpc tests (no tests here).

``husk.ttrpctest.Probe`` is built at import from protobuf well-known types, so
it needs no protoc; it has every call shape ttrpc supports::

    Echo(StringValue) -> StringValue            the request
    Meta(Empty) -> StringValue                  JSON of the incoming metadata
    Sleep(DoubleValue s) -> DoubleValue         sleeps; replies with the deadline seen (-1: none)
    Fail(StringValue kind) -> Empty             raises the error named by kind
    Big(Int64Value n) -> BytesValue             n bytes (to overflow the maximum)
    Split(StringValue) -> stream StringValue    one message per word
    Join(stream StringValue) -> StringValue     the words joined by spaces
    Chat(stream StringValue) -> stream StringValue   each message upper-cased
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, wrappers_pb2
from google.protobuf.descriptor import ServiceDescriptor

from agent_proto import ttrpc_pb2
from shim.errors import NotFoundError
from ttrpc import CallContext, Client, Server, ServerStream
from ttrpc.frame import Frame, FrameReader, MessageType, encode_header

SERVICE = "husk.ttrpctest.Probe"

_METHODS = {
    # name: (request, response, client_streaming, server_streaming)
    "Echo": ("StringValue", "StringValue", False, False),
    "Meta": ("Empty", "StringValue", False, False),
    "Sleep": ("DoubleValue", "DoubleValue", False, False),
    "Fail": ("StringValue", "Empty", False, False),
    "Big": ("Int64Value", "BytesValue", False, False),
    "Split": ("StringValue", "StringValue", False, True),
    "Join": ("StringValue", "StringValue", True, False),
    "Chat": ("StringValue", "StringValue", True, True),
}


def _build() -> ServiceDescriptor:
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(SERVICE)
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="husk/ttrpctest/probe.proto",
        package="husk.ttrpctest",
        syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name, empty_pb2.DESCRIPTOR.name],
    )
    service = file.service.add(name="Probe")
    for name, (request, response, client_streaming, server_streaming) in _METHODS.items():
        service.method.add(
            name=name,
            input_type=f".google.protobuf.{request}",
            output_type=f".google.protobuf.{response}",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    pool.Add(file)
    return pool.FindServiceByName(SERVICE)


PROBE: ServiceDescriptor = _build()


class ProbeService:
    """The test implementation of Probe; records what it saw."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.contexts: list[CallContext] = []

    async def Echo(
        self, request: wrappers_pb2.StringValue, ctx: CallContext
    ) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=request.value)

    async def Meta(self, request: empty_pb2.Empty, ctx: CallContext) -> wrappers_pb2.StringValue:
        self.contexts.append(ctx)
        return wrappers_pb2.StringValue(value=json.dumps(ctx.metadata, sort_keys=True))

    async def Sleep(
        self, request: wrappers_pb2.DoubleValue, ctx: CallContext
    ) -> wrappers_pb2.DoubleValue:
        self.started += 1
        seen = -1.0 if ctx.deadline == math.inf else ctx.deadline - trio.current_time()
        await trio.sleep(request.value)
        self.finished += 1
        return wrappers_pb2.DoubleValue(value=seen)

    async def Fail(self, request: wrappers_pb2.StringValue, ctx: CallContext) -> empty_pb2.Empty:
        if request.value == "notfound":
            raise NotFoundError("container c1 not found")
        if request.value == "none":
            return None  # type: ignore[return-value]
        raise ValueError("secret internals")

    async def Big(
        self, request: wrappers_pb2.Int64Value, ctx: CallContext
    ) -> wrappers_pb2.BytesValue:
        return wrappers_pb2.BytesValue(value=b"x" * request.value)

    async def Split(self, request: wrappers_pb2.StringValue, stream: ServerStream) -> None:
        if request.value == "fail":
            raise NotFoundError("nothing to split")
        for word in request.value.split():
            await stream.send(wrappers_pb2.StringValue(value=word))

    async def Join(self, stream: ServerStream) -> wrappers_pb2.StringValue:
        words = [message.value async for message in stream]  # type: ignore[attr-defined]
        return wrappers_pb2.StringValue(value=" ".join(words))

    async def Chat(self, stream: ServerStream) -> None:
        async for message in stream:
            await stream.send(wrappers_pb2.StringValue(value=message.value.upper()))  # type: ignore[attr-defined]


def probe_server(**options: float) -> tuple[Server, ProbeService]:
    """A server with Probe registered, and the implementation behind it."""
    server = Server(**options)  # type: ignore[arg-type]
    service = ProbeService()
    server.register(PROBE, service)
    return server, service


@asynccontextmanager
async def connected(server: Server) -> AsyncIterator[Client]:
    """A client connected to ``server`` through an in-memory stream pair."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        async with Client.open(client_end) as client:
            yield client


class RawPeer:
    """A hand-driven client end: writes arbitrary bytes, reads frames back."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = FrameReader(stream)

    async def send_frame(
        self, stream_id: int, message_type: int, flags: int, payload: bytes
    ) -> None:
        await self.stream.send_all(
            encode_header(len(payload), stream_id, message_type, flags) + payload
        )

    async def send_request(
        self, stream_id: int, method: str, payload: bytes = b"", **fields: object
    ) -> None:
        request = ttrpc_pb2.Request(service=SERVICE, method=method, payload=payload, **fields)  # type: ignore[arg-type]
        await self.send_frame(stream_id, MessageType.REQUEST, 0, request.SerializeToString())

    async def receive(self) -> Frame | None:
        return await self.reader.receive()

    async def response(self) -> tuple[int, ttrpc_pb2.Response]:
        frame = await self.reader.receive()
        assert frame is not None, "connection closed instead of answering"
        assert frame.message_type == MessageType.RESPONSE
        return frame.stream_id, ttrpc_pb2.Response.FromString(frame.payload)


@asynccontextmanager
async def raw_connection(server: Server) -> AsyncIterator[RawPeer]:
    """A raw peer connected to ``server``; the server must finish when it leaves."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        yield RawPeer(client_end)
        await client_end.aclose()
