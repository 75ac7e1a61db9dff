"""The one place where exceptions become ttrpc statuses, and statuses errors.

A server handler's exception is mapped by what it *is*, never by its cause:

- an exception whose ``code`` attribute is a :class:`Code` (every husk error,
  :class:`RpcError` re-raised from a downstream call) → that code and ``str(exc)``;
- ``trio.TooSlowError`` (a deadline passed) → DEADLINE_EXCEEDED;
- an exception group holding exactly one exception → that exception's mapping;
- anything else → INTERNAL with the exception's type and message. Tracebacks
  stay in the server's log and never reach the wire.
"""

from __future__ import annotations

import trio

from agent_proto import status_pb2
from ttrpc.codes import Code
from ttrpc.errors import DeadlineExceeded, RpcError


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
    return status_pb2.Status(code=int(code), message=message)


def error_from_status(status: status_pb2.Status) -> RpcError | None:
    """Return the error a client raises for ``status``, or None when it is OK."""
    if status.code == Code.OK:
        return None
    try:
        code = Code(status.code)
    except ValueError:
        return RpcError(Code.UNKNOWN, f"unknown status code {status.code}: {status.message}")
    if code is Code.DEADLINE_EXCEEDED:
        return DeadlineExceeded(status.message)
    return RpcError(code, status.message)
