"""The one mapping from exceptions to ttrpc statuses, and back."""

from __future__ import annotations

import trio

from agent_proto import status_pb2
from shim.errors import HostError, NotFoundError, NotSupportedError
from ttrpc import (
    Code,
    DeadlineExceeded,
    RpcError,
    code_and_message,
    error_from_status,
    status_from_exception,
)
from ttrpc.status import MAX_STATUS_MESSAGE, bounded_message


def test_husk_error_maps_to_its_class_code_and_message() -> None:
    status = status_from_exception(NotFoundError("container c1 not found"))
    assert (status.code, status.message) == (Code.NOT_FOUND, "container c1 not found")


def test_husk_error_subclass_inherits_its_parents_code() -> None:
    assert code_and_message(HostError("no /dev/kvm"))[0] is Code.FAILED_PRECONDITION
    assert code_and_message(NotSupportedError("qemu", "save"))[0] is Code.UNIMPLEMENTED


def test_rpc_error_from_a_downstream_call_keeps_its_code() -> None:
    assert code_and_message(RpcError(Code.ALREADY_EXISTS, "exists")) == (
        Code.ALREADY_EXISTS,
        "exists",
    )


def test_too_slow_maps_to_deadline_exceeded() -> None:
    assert code_and_message(trio.TooSlowError())[0] is Code.DEADLINE_EXCEEDED


def test_unknown_exception_maps_to_internal_with_type_and_message_only() -> None:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        code, message = code_and_message(exc)
    assert (code, message) == (Code.INTERNAL, "ValueError: bad value")
    assert "Traceback" not in message


def test_code_attribute_that_is_not_a_code_is_ignored() -> None:
    assert code_and_message(SystemExit(3))[0] is Code.INTERNAL


def test_group_of_one_maps_like_its_member() -> None:
    group = ExceptionGroup("nursery", [ExceptionGroup("inner", [NotFoundError("gone")])])
    assert code_and_message(group) == (Code.NOT_FOUND, "gone")


def test_ok_status_is_no_error() -> None:
    assert error_from_status(status_pb2.Status()) is None


def test_error_status_becomes_rpc_error_with_code() -> None:
    error = error_from_status(status_pb2.Status(code=Code.NOT_FOUND, message="no c1"))
    assert isinstance(error, RpcError)
    assert (error.code, error.message) == (Code.NOT_FOUND, "no c1")


def test_deadline_status_becomes_deadline_exceeded() -> None:
    error = error_from_status(status_pb2.Status(code=Code.DEADLINE_EXCEEDED, message="late"))
    assert isinstance(error, DeadlineExceeded)


def test_unknown_status_code_becomes_unknown() -> None:
    error = error_from_status(status_pb2.Status(code=99, message="what"))
    assert error is not None and error.code is Code.UNKNOWN


def test_a_long_status_message_is_cut_on_a_character_and_says_how_much_was_cut() -> None:
    short = "é" * 10
    assert bounded_message(short) == short
    long = "é" * MAX_STATUS_MESSAGE  # 2 bytes each
    cut = bounded_message(long)
    assert cut == "é" * (MAX_STATUS_MESSAGE // 2) + f" … [{MAX_STATUS_MESSAGE} bytes cut]"
    odd = "a" + "é" * MAX_STATUS_MESSAGE  # the limit falls inside a character
    assert bounded_message(odd).startswith("a" + "é" * (MAX_STATUS_MESSAGE // 2 - 1) + " … [")
