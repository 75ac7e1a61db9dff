"""Errors of the QMP client, drawn as a tree (callers catch the semantic class)::

    HypervisorError                    (shim.errors: INTERNAL)
     └── QmpError                      anything that went wrong talking QMP
          ├── QmpProtocolError         QEMU sent something that is not QMP
          │    └── QmpGreetingError    no or bad greeting, or capabilities refused
          ├── QmpConnectionLost        the socket closed: QEMU exited or crashed
          └── QmpCommandError          QEMU answered a command with {"error": ...}
                                       (carries QEMU's ``class`` and ``desc``)

Messages carry no prefix; whoever prints them adds context.
"""

from __future__ import annotations

from shim.errors import HypervisorError


class QmpError(HypervisorError):
    """Base of every QMP failure."""


class QmpProtocolError(QmpError):
    """A message that is not valid QMP (bad JSON, unexpected shape)."""


class QmpGreetingError(QmpProtocolError):
    """The greeting or the ``qmp_capabilities`` negotiation failed."""


class QmpConnectionLost(QmpError):
    """The QMP connection closed while a command or event was awaited."""


class QmpCommandError(QmpError):
    """QEMU refused a command: ``error_class`` and ``desc`` are QEMU's own words."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {desc} ({error_class})")
