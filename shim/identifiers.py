"""containerd's identifier rules, checked before any host path is built from an id.

Sandbox and container ids name directories under ``[runtime] state_dir`` and
mount points below them; an id of ``..`` or one with a ``/`` would lead a path
elsewhere. containerd's own rule (``pkg/identifiers``): alphanumerics, with
single ``.``, ``_`` or ``-`` between them, at most 76 characters. An id from a
CRI annotation (the pod's sandbox id) is held to the same rule.
"""

from __future__ import annotations

import re

from shim.errors import InvalidArgumentError

MAX_LENGTH = 76
#: matched with ``fullmatch``: ``$`` would also accept a trailing newline
_VALID = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def validate(kind: str, value: str) -> str:
    """``value`` if it is a valid identifier, else InvalidArgument naming it."""
    if not value:
        raise InvalidArgumentError(f"{kind} id must not be empty")
    if len(value) > MAX_LENGTH:
        raise InvalidArgumentError(
            f"{kind} id {value[:20]!r}... is {len(value)} characters; at most {MAX_LENGTH}"
        )
    if not _VALID.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind} id {value!r} is invalid: use letters and digits, with single '.', '_' "
            "or '-' between them (containerd's identifier rules)"
        )
    return value
