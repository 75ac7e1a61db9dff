"""ttrpc (containerd's lightweight RPC) on trio streams.

What other packages may import; everything else in ``shim.ttrpc`` is private.
The wire format follows containerd/ttrpc (PROTOCOL.md, version 1.2 with
streaming); the package knows nothing of transports or of containerd.
"""

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
