"""ttrpc (containerd's lightweight RPC) on trio streams.

What other packages may import; everything else in ``shim.ttrpc`` is private.
The wire format follows containerd/ttrpc (PROTOCOL.md, version 1.2 with
streaming); the package knows nothing of transports or of containerd.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shim.ttrpc.client import Client, Stub
    from shim.ttrpc.codes import Code
    from shim.ttrpc.errors import (
        ConnectionClosed,
        DeadlineExceeded,
        FrameTooLarge,
        InvalidPayload,
        MessageTooLarge,
        ProtocolError,
        RpcError,
        TruncatedFrame,
        TtrpcError,
        UnknownMethod,
    )
    from shim.ttrpc.frame import MAX_MESSAGE_SIZE
    from shim.ttrpc.server import Server
    from shim.ttrpc.service import CallContext, MethodSpec, ServiceRegistry
    from shim.ttrpc.status import code_and_message, error_from_status, status_from_exception
    from shim.ttrpc.stream import ClientStream, ServerStream

# Resolved on first use: importing one light module (e.g. ``shim.ttrpc.codes``
# for the error tree) must not load the client, the server and trio with it.
_PUBLIC = {
    "CallContext": "shim.ttrpc.service",
    "Client": "shim.ttrpc.client",
    "ClientStream": "shim.ttrpc.stream",
    "Code": "shim.ttrpc.codes",
    "ConnectionClosed": "shim.ttrpc.errors",
    "DeadlineExceeded": "shim.ttrpc.errors",
    "FrameTooLarge": "shim.ttrpc.errors",
    "InvalidPayload": "shim.ttrpc.errors",
    "MAX_MESSAGE_SIZE": "shim.ttrpc.frame",
    "MessageTooLarge": "shim.ttrpc.errors",
    "MethodSpec": "shim.ttrpc.service",
    "ProtocolError": "shim.ttrpc.errors",
    "RpcError": "shim.ttrpc.errors",
    "Server": "shim.ttrpc.server",
    "ServerStream": "shim.ttrpc.stream",
    "ServiceRegistry": "shim.ttrpc.service",
    "Stub": "shim.ttrpc.client",
    "TruncatedFrame": "shim.ttrpc.errors",
    "TtrpcError": "shim.ttrpc.errors",
    "UnknownMethod": "shim.ttrpc.errors",
    "code_and_message": "shim.ttrpc.status",
    "error_from_status": "shim.ttrpc.status",
    "status_from_exception": "shim.ttrpc.status",
}


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'shim.ttrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MAX_MESSAGE_SIZE",
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "ConnectionClosed",
    "DeadlineExceeded",
    "FrameTooLarge",
    "InvalidPayload",
    "MessageTooLarge",
    "MethodSpec",
    "ProtocolError",
    "RpcError",
    "Server",
    "ServerStream",
    "ServiceRegistry",
    "Stub",
    "TruncatedFrame",
    "TtrpcError",
    "UnknownMethod",
    "code_and_message",
    "error_from_status",
    "status_from_exception",
]
