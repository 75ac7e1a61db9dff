"""The husk exception tree.

Every failure a user can see is one of these, with a one-line message that says
what failed, on which object, and what to do. Each class carries the gRPC code
the ttrpc server answers with (the mapping itself lives in one place:
``shim.ttrpc.status``, which reads ``code`` and knows nothing else of husk)::

    HuskError                          INTERNAL
     ├── ConfigError                   INVALID_ARGUMENT  bad or unknown config key
     ├── InvalidArgumentError          INVALID_ARGUMENT
     ├── NotFoundError                 NOT_FOUND
     ├── AlreadyExistsError            ALREADY_EXISTS
     ├── FailedPreconditionError       FAILED_PRECONDITION
     │    └── HostError                host lacks what a sandbox needs
     ├── DeadlineExceededError         DEADLINE_EXCEEDED
     ├── UnimplementedError            UNIMPLEMENTED
     │    └── NotSupportedError        a plugin lacks a capability (names plugin + op)
     └── HypervisorError               INTERNAL          the VMM failed
          └── VmmExitedError           the VMM process died (carries its last stderr)

Messages carry no "error:" prefix; whoever prints them adds context.
"""

from __future__ import annotations

from typing import ClassVar

from shim.ttrpc.codes import Code


class HuskError(Exception):
    """Base of every husk error; ``code`` is the gRPC status code it maps to."""

    code: ClassVar[Code] = Code.INTERNAL


class ConfigError(HuskError):
    """The configuration file has a bad value, an unknown key or cannot be read."""

    code = Code.INVALID_ARGUMENT


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


class HostError(FailedPreconditionError):
    """The host lacks something a sandbox needs (binary, device, image)."""


class DeadlineExceededError(HuskError):
    """An operation did not finish within its configured timeout."""

    code = Code.DEADLINE_EXCEEDED


class UnimplementedError(HuskError):
    """The operation is not implemented."""

    code = Code.UNIMPLEMENTED


class NotSupportedError(UnimplementedError):
    """A hypervisor plugin does not support an operation on this host."""

    def __init__(self, plugin: str, operation: str, reason: str = "") -> None:
        self.plugin = plugin
        self.operation = operation
        detail = f": {reason}" if reason else ""
        super().__init__(f"hypervisor '{plugin}' does not support {operation}{detail}")


class HypervisorError(HuskError):
    """The VMM failed or answered with an error."""


class VmmExitedError(HypervisorError):
    """The VMM process exited while husk still needed it."""

    def __init__(self, plugin: str, returncode: int | None, stderr_tail: str = "") -> None:
        self.plugin = plugin
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        tail = f": {stderr_tail.strip()}" if stderr_tail.strip() else ""
        super().__init__(f"{plugin} exited with status {returncode}{tail}")
