"""The one place where exceptions become ttrpc statuses, and statuses errors.

A server handler's exception is mapped by what it *is*, never by its cause:

- an exception whose ``code`` attribute is a :class:`Code` (every husk error,
  :class:`RpcError` re-raised from a downstream call) → that code and ``str(exc)``;
- ``trio.TooSlowError`` (a deadline passed) → DEADLINE_EXCEEDED;
- an exception group holding exactly one exception → that exception's mapping;
- anything else → INTERNAL with the exception's type and message. Tracebacks
  stay in the server's log and never reach the wire.

A status message is text from the peer, up to a whole frame (4 MiB) of it: both
directions cut it to :data:`MAX_STATUS_MESSAGE` bytes and say how much was cut,
so an error from a hostile peer reaches logs and callers a few KiB long.
"""

from __future__ import annotations

import trio

from agent_proto import status_pb2
from ttrpc.codes import Code
from ttrpc.errors import DeadlineExceeded, RpcError

#: the most bytes of a status message kept (the rest is cut, and counted)
MAX_STATUS_MESSAGE = 4096


def bounded_message(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """``message``, cut to ``limit`` UTF-8 bytes with ``… [N bytes cut]`` when longer."""
    data = message.encode(errors="replace")
    if len(data) <= limit:
        return message
    kept = data[:limit].decode(errors="ignore")  # never half a character
    return f"{kept} … [{len(data) - len(kept.encode())} bytes cut]"


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def code_and_message(exc: BaseException) -> tuple[Code, str]:
    """Return the status code and message that ``exc`` maps to."""
    exc = _single_leaf(exc)
    code = getattr(exc, "code", None)
    if isinstance(code, Code) and code is not Code.OK:
        return code, str(exc) or type(exc).__name__
    if isinstance(exc, trio.TooSlowError):
        return Code.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    detail = str(exc)
    name = type(exc).__name__
    return Code.INTERNAL, f"{name}: {detail}" if detail else name


def status_from_exception(exc: BaseException) -> status_pb2.Status:
    """Return the ``google.rpc.Status`` a server answers with for ``exc``."""
    code, message = code_and_message(exc)
    return status_pb2.Status(code=int(code), message=bounded_message(message))


def error_from_status(status: status_pb2.Status) -> RpcError | None:
    """Return the error a client raises for ``status``, or None when it is OK."""
    if status.code == Code.OK:
        return None
    message = bounded_message(status.message)
    try:
        code = Code(status.code)
    except ValueError:
        return RpcError(Code.UNKNOWN, f"unknown status code {status.code}: {message}")
    if code is Code.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    return RpcError(code, message)
