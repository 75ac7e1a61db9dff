"""What other packages may import from shim.ttrpc (the rest is private)."""

from __future__ import annotations

import shim.ttrpc


def test_public_names_are_pinned() -> None:
    assert set(shim.ttrpc.__all__) == {
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
    }
    assert all(hasattr(shim.ttrpc, name) for name in shim.ttrpc.__all__)


def test_connection_closed_is_an_unavailable_rpc_error() -> None:
    error = shim.ttrpc.ConnectionClosed("peer went away")
    assert isinstance(error, shim.ttrpc.RpcError)
    assert error.code is shim.ttrpc.Code.UNAVAILABLE
    assert "peer went away" in str(error)
