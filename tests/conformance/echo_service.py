"""``husk.test.Echo``: the test service both peers serve, built without protoc.

The Go peer (``go/ttrpcpeer``) registers the same service by hand. Its messages
are protobuf well-known types, so the descriptor is assembled here at import
and added to the default pool; husk's server registers it like any generated
service descriptor.

    Echo(BytesValue) -> BytesValue        the request, unchanged
    Metadata(Empty) -> StringValue        JSON object {key: [values...]} of incoming metadata
    Sleep(Int64Value ms) -> Int64Value    sleeps ms; replies with the deadline seen on arrival,
                                          in ms (-1: none)
    Fail(Int32Value code) -> Empty        fails with that code, "fail with code N"
"""

from __future__ import annotations

import json
import math

import trio
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, wrappers_pb2
from google.protobuf.descriptor import ServiceDescriptor

from ttrpc.codes import Code
from ttrpc.errors import RpcError
from ttrpc.service import CallContext

SERVICE = "husk.test.Echo"

_METHODS = {
    "Echo": ("BytesValue", "BytesValue"),
    "Metadata": ("Empty", "StringValue"),
    "Sleep": ("Int64Value", "Int64Value"),
    "Fail": ("Int32Value", "Empty"),
}


def _build() -> ServiceDescriptor:
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(SERVICE)
    except KeyError:
        pass
    # make sure the well-known files are in the default pool before depending on them
    deps = [wrappers_pb2.DESCRIPTOR.name, empty_pb2.DESCRIPTOR.name]
    file = descriptor_pb2.FileDescriptorProto(
        name="husk/test/echo.proto", package="husk.test", syntax="proto3", dependency=deps
    )
    svc = file.service.add(name="Echo")
    for name, (request, response) in _METHODS.items():
        svc.method.add(
            name=name,
            input_type=f".google.protobuf.{request}",
            output_type=f".google.protobuf.{response}",
        )
    pool.Add(file)
    return pool.FindServiceByName(SERVICE)


DESCRIPTOR: ServiceDescriptor = _build()


class EchoService:
    """husk's implementation of ``husk.test.Echo``, same behaviour as the Go peer."""

    def __init__(self) -> None:
        self.calls = 0

    async def Echo(
        self, request: wrappers_pb2.BytesValue, ctx: CallContext
    ) -> wrappers_pb2.BytesValue:
        self.calls += 1
        return wrappers_pb2.BytesValue(value=request.value)

    async def Metadata(
        self, request: empty_pb2.Empty, ctx: CallContext
    ) -> wrappers_pb2.StringValue:
        self.calls += 1
        md = {k: list(v) for k, v in ctx.metadata.items()}
        return wrappers_pb2.StringValue(value=json.dumps(md))

    async def Sleep(
        self, request: wrappers_pb2.Int64Value, ctx: CallContext
    ) -> wrappers_pb2.Int64Value:
        self.calls += 1
        seen = -1
        if ctx.deadline != math.inf:
            seen = int((ctx.deadline - trio.current_time()) * 1000)
        await trio.sleep(request.value / 1000)
        return wrappers_pb2.Int64Value(value=seen)

    async def Fail(self, request: wrappers_pb2.Int32Value, ctx: CallContext) -> empty_pb2.Empty:
        self.calls += 1
        raise RpcError(Code(request.value), f"fail with code {request.value}")
