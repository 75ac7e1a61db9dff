"""What other packages may import from ttrpc (the rest is private)."""

from __future__ import annotations

import ttrpc


def test_public_names_are_pinned() -> None:
    assert set(ttrpc.__all__) == {
        "HEADER_SIZE",
        "MAX_MESSAGE_SIZE",
        "FrameHeader",
        "MessageType",
        "decode_header",
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
    assert all(hasattr(ttrpc, name) for name in ttrpc.__all__)


def test_connection_closed_is_an_unavailable_rpc_error() -> None:
    error = ttrpc.ConnectionClosed("peer went away")
    assert isinstance(error, ttrpc.RpcError)
    assert error.code is ttrpc.Code.UNAVAILABLE
    assert "peer went away" in str(error)
