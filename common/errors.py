"""The base of husk's exception tree, shared by the shim and the guest agent.

Every failure a user can see is one of these (or of a subclass the shim or the
agent adds), with a one-line message that says what failed, on which object,
and what to do. Each class carries the gRPC code a ttrpc server answers with;
the mapping itself lives in one place, ``ttrpc.status``, which reads ``code``
and knows nothing else of husk::

    HuskError                          INTERNAL
     ├── InvalidArgumentError          INVALID_ARGUMENT
     ├── NotFoundError                 NOT_FOUND
     ├── AlreadyExistsError            ALREADY_EXISTS
     ├── FailedPreconditionError       FAILED_PRECONDITION
     ├── DeadlineExceededError         DEADLINE_EXCEEDED
     ├── ResourceExhaustedError        RESOURCE_EXHAUSTED
     └── UnimplementedError            UNIMPLEMENTED

Messages carry no "error:" prefix; whoever prints them adds context.
"""

from __future__ import annotations

from typing import ClassVar

from ttrpc.codes import Code


class HuskError(Exception):
    """Base of every husk error; ``code`` is the gRPC status code it maps to."""

    code: ClassVar[Code] = Code.INTERNAL


class InvalidArgumentError(HuskError):
    """A request carried a value husk cannot use."""

    code = Code.INVALID_ARGUMENT


class NotFoundError(HuskError):
    """The named object (sandbox, container, process, device) does not exist."""

    code = Code.NOT_FOUND


class AlreadyExistsError(HuskError):
    """An object with that id already exists."""

    code = Code.ALREADY_EXISTS


class FailedPreconditionError(HuskError):
    """The object is not in a state that allows the operation."""

    code = Code.FAILED_PRECONDITION


class DeadlineExceededError(HuskError):
    """An operation did not finish within its configured timeout."""

    code = Code.DEADLINE_EXCEEDED


class ResourceExhaustedError(HuskError):
    """A bounded queue or limit is full."""

    code = Code.RESOURCE_EXHAUSTED


class UnimplementedError(HuskError):
    """The operation is not implemented."""

    code = Code.UNIMPLEMENTED
