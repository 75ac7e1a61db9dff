"""ttrpc (containerd's lightweight RPC) on trio streams.

What other packages may import; everything else in ``ttrpc`` is private.
The wire format follows containerd/ttrpc (PROTOCOL.md, version 1.2 with
streaming); the package knows nothing of transports or of containerd.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ttrpc.client import Client, Stub
    from ttrpc.codes import Code
    from ttrpc.errors import (
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
    from ttrpc.frame import HEADER_SIZE, MAX_MESSAGE_SIZE, FrameHeader, MessageType, decode_header
    from ttrpc.server import Server
    from ttrpc.service import CallContext, MethodSpec, ServiceRegistry
    from ttrpc.status import code_and_message, error_from_status, status_from_exception
    from ttrpc.stream import ClientStream, ServerStream

# Resolved on first use: importing one light module (e.g. ``ttrpc.codes``
# for the error tree) must not load the client, the server and trio with it.
_PUBLIC = {
    "CallContext": "ttrpc.service",
    "Client": "ttrpc.client",
    "ClientStream": "ttrpc.stream",
    "Code": "ttrpc.codes",
    "ConnectionClosed": "ttrpc.errors",
    "DeadlineExceeded": "ttrpc.errors",
    "FrameTooLarge": "ttrpc.errors",
    "InvalidPayload": "ttrpc.errors",
    "MAX_MESSAGE_SIZE": "ttrpc.frame",
    "HEADER_SIZE": "ttrpc.frame",
    "FrameHeader": "ttrpc.frame",
    "MessageType": "ttrpc.frame",
    "decode_header": "ttrpc.frame",
    "MessageTooLarge": "ttrpc.errors",
    "MethodSpec": "ttrpc.service",
    "ProtocolError": "ttrpc.errors",
    "RpcError": "ttrpc.errors",
    "Server": "ttrpc.server",
    "ServerStream": "ttrpc.stream",
    "ServiceRegistry": "ttrpc.service",
    "Stub": "ttrpc.client",
    "TruncatedFrame": "ttrpc.errors",
    "TtrpcError": "ttrpc.errors",
    "UnknownMethod": "ttrpc.errors",
    "code_and_message": "ttrpc.status",
    "error_from_status": "ttrpc.status",
    "status_from_exception": "ttrpc.status",
}


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ttrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "ConnectionClosed",
    "DeadlineExceeded",
    "FrameHeader",
    "FrameTooLarge",
    "InvalidPayload",
    "MessageTooLarge",
    "MessageType",
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
    "decode_header",
    "error_from_status",
    "status_from_exception",
]
