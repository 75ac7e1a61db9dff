"""The ttrpc exception tree.

Callers catch the semantic class, never the cause. Each message is one line
with no prefix::

    TtrpcError
     ├── ProtocolError              the peer broke the wire protocol
     │    ├── FrameTooLarge         incoming frame over the maximum (carries header)
     │    └── TruncatedFrame        the stream ended inside a frame
     ├── InvalidPayload             a payload does not decode   (INVALID_ARGUMENT)
     ├── UnknownMethod              no such service or method   (UNIMPLEMENTED)
     └── RpcError                   a call ended with a non-OK status (carries code)
          ├── DeadlineExceeded      the call's timeout passed   (DEADLINE_EXCEEDED)
          ├── MessageTooLarge       an outgoing message is over the maximum
          │                                                     (RESOURCE_EXHAUSTED)
          └── ConnectionClosed      the connection is gone, with the reason
                                                                (UNAVAILABLE)

Every class that a server handler might raise carries ``code``, so
``ttrpc.status`` maps it like any husk error.
"""

from __future__ import annotations

from ttrpc.codes import Code


class TtrpcError(Exception):
    """Base of every ttrpc error."""


class ProtocolError(TtrpcError):
    """The peer sent something the ttrpc wire protocol does not allow."""


class FrameTooLarge(ProtocolError):
    """An incoming frame announced a payload longer than the maximum.

    The reader skips the payload, so the connection stays usable; the header is
    kept so the receiver can answer on that stream.
    """

    def __init__(self, stream_id: int, message_type: int, length: int, limit: int) -> None:
        self.stream_id = stream_id
        self.message_type = message_type
        self.length = length
        self.limit = limit
        super().__init__(
            f"message length {length} on stream {stream_id} exceeds the maximum of {limit}"
        )


class TruncatedFrame(ProtocolError):
    """The byte stream ended in the middle of a frame."""


class InvalidPayload(TtrpcError):
    """A protobuf payload could not be decoded into the expected message."""

    code = Code.INVALID_ARGUMENT


class UnknownMethod(TtrpcError):
    """The server has no such service, or the service no such method."""

    code = Code.UNIMPLEMENTED


class RpcError(TtrpcError):
    """A call ended with a non-OK status; ``code`` and ``message`` come from it."""

    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class DeadlineExceeded(RpcError):
    """The call did not finish within its timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.DEADLINE_EXCEEDED, message)


class MessageTooLarge(RpcError):
    """An outgoing message is longer than the protocol's maximum."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(
            Code.RESOURCE_EXHAUSTED,
            f"message length {length} exceeds the maximum message size of {limit}",
        )


class ConnectionClosed(RpcError):
    """The connection is closed or broken; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(Code.UNAVAILABLE, f"ttrpc connection closed: {reason}")
