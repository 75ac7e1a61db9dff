"""Errors the agent adds to the shared tree (``common.errors``)::

    HuskError
     └── StreamClosedError   OUT_OF_RANGE   a process's stdout/stderr is at EOF

Kata's agent answers ReadStdout/ReadStderr at EOF with an error rather than
empty data, and its runtime ends the copy on any error; husk does the same with
a code of its own, so a client can tell EOF from a failure without parsing text.
"""

from __future__ import annotations

from common.errors import HuskError
from ttrpc.codes import Code


class StreamClosedError(HuskError):
    """A process's output stream has reached EOF (or its stdin is closed)."""

    code = Code.OUT_OF_RANGE
