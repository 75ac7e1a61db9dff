"""Service registration from generated protobuf service descriptors.

An implementation is any object with async methods named **exactly like the
RPCs** in the ``.proto`` (``Create``, ``CloseIO``, ``ResizePty``): the names
containerd and Kata use on the wire, with no case conversion to get wrong.
The method's shape follows the RPC's streaming flags::

    rpc Unary(Req) returns (Resp)                 async def Unary(self, request, ctx) -> Resp
    rpc Watch(Req) returns (stream Ev)            async def Watch(self, request, stream) -> None
    rpc Upload(stream Chunk) returns (Resp)       async def Upload(self, stream) -> Resp
    rpc Chat(stream Msg) returns (stream Msg)     async def Chat(self, stream) -> None

``ctx`` (and ``stream.context``) is a :class:`CallContext`. RPCs the object
does not define answer UNIMPLEMENTED, so a partial service is fine while it
grows; an object that defines none of them is refused at registration.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from ttrpc.errors import UnknownMethod

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about the call besides its request."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float = math.inf
    """The call's deadline on trio's clock; ``inf`` when the client set none."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One servable RPC: its message types, streaming shape and handler."""

    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]
    handler: Handler
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def is_unary(self) -> bool:
        """True when neither side streams."""
        return not (self.client_streaming or self.server_streaming)


def method_spec(service: str, method: MethodDescriptor, handler: Handler) -> MethodSpec:
    """Build the spec of one RPC from its descriptor."""
    return MethodSpec(
        service=service,
        name=method.name,
        request_type=GetMessageClass(method.input_type),
        response_type=GetMessageClass(method.output_type),
        handler=handler,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


class ServiceRegistry:
    """Maps (service, method) names to their :class:`MethodSpec`."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, MethodSpec]] = {}

    def add(self, spec: MethodSpec) -> None:
        """Register one method; registering the same name twice is an error."""
        methods = self._services.setdefault(spec.service, {})
        if spec.name in methods:
            raise ValueError(f"ttrpc method {spec.service}/{spec.name} is already registered")
        methods[spec.name] = spec

    def register(self, descriptor: ServiceDescriptor, implementation: object) -> list[str]:
        """Register every RPC of ``descriptor`` that ``implementation`` defines.

        Returns the registered method names.
        """
        service = descriptor.full_name
        if service in self._services:
            raise ValueError(f"ttrpc service {service} is already registered")
        found: list[MethodSpec] = []
        for method in descriptor.methods:
            handler = getattr(implementation, method.name, None)
            if handler is None:
                continue
            if not callable(handler):
                raise TypeError(f"{type(implementation).__name__}.{method.name} is not callable")
            found.append(method_spec(service, method, handler))
        if not found:
            expected = ", ".join(m.name for m in descriptor.methods)
            raise ValueError(
                f"{type(implementation).__name__} implements no RPC of {service}; "
                f"define methods named exactly like the RPCs: {expected}"
            )
        for spec in found:
            self.add(spec)
        return [spec.name for spec in found]

    def lookup(self, service: str, method: str) -> MethodSpec:
        """Return the spec for a call, or raise :class:`UnknownMethod`."""
        methods = self._services.get(service)
        if methods is None:
            raise UnknownMethod(f"unknown service {service}")
        spec = methods.get(method)
        if spec is None:
            raise UnknownMethod(f"unknown method {method} of service {service}")
        return spec
