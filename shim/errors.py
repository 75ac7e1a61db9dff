"""The host side's exception tree: ``common.errors`` plus what only the shim raises.

Plugins and the rest of ``shim`` import every error from here::

    HuskError                          INTERNAL          (common.errors)
     ├── ConfigError                   INVALID_ARGUMENT  bad or unknown config key
     ├── InvalidArgumentError          INVALID_ARGUMENT
     ├── NotFoundError                 NOT_FOUND
     ├── AlreadyExistsError            ALREADY_EXISTS
     ├── FailedPreconditionError       FAILED_PRECONDITION
     │    └── HostError                host lacks what a sandbox needs
     ├── DeadlineExceededError         DEADLINE_EXCEEDED
     ├── ResourceExhaustedError        RESOURCE_EXHAUSTED
     ├── UnimplementedError            UNIMPLEMENTED
     │    └── NotSupportedError        a plugin lacks a capability (names plugin + op)
     ├── HypervisorError               INTERNAL          the VMM failed
     │    └── VmmExitedError           the VMM process died (carries its last stderr)
     └── AgentReplyError               INTERNAL          the guest agent's answer is not a reply

Messages carry no "error:" prefix; whoever prints them adds context.
"""

from __future__ import annotations

from common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    HuskError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnimplementedError,
)
from ttrpc.codes import Code

__all__ = [
    "AgentReplyError",
    "AlreadyExistsError",
    "ConfigError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "HostError",
    "HuskError",
    "HypervisorError",
    "InvalidArgumentError",
    "NotFoundError",
    "NotSupportedError",
    "ResourceExhaustedError",
    "UnimplementedError",
    "VmmExitedError",
]


class ConfigError(HuskError):
    """The configuration file has a bad value, an unknown key or cannot be read."""

    code = Code.INVALID_ARGUMENT


class HostError(FailedPreconditionError):
    """The host lacks something a sandbox needs (binary, device, image)."""


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


class AgentReplyError(HuskError):
    """The guest agent answered a call with something that is not a valid reply.

    The guest is untrusted: a reply that does not decode, or comes as the wrong
    kind of message, fails that one call and nothing else.
    """
