"""The VM pool's messages: one JSON object per line on a unix stream socket.

Two conversations use it. A shim's ``start`` (or ``husk factory``) asks the
daemon at ``[factory] vm_cache_endpoint``::

    → {"op": "claim", "id": ..., "namespace": ..., "bundle": ..., "address": ...,
       "publish_binary": ..., "ttrpc_address": ..., "debug": false, "config": ...}
    ← {"ok": true, "socket": "/run/husk/<id>/shim.sock"}   or   {"ok": false, "reason": ...}
    → {"op": "status"}     ← {"ok": true, "size": ..., "ready": ..., ...}
    → {"op": "stop"}       ← {"ok": true}

and the daemon talks to each pool member over a socketpair: the member says
``{"event": "ready", ...}`` once its VM is booted and exercised, the daemon
passes a claim on as ``{"op": "claim", ...}``, and the member answers
``{"event": "claimed", "socket": ...}`` or ``{"event": "refused", "reason": ...}``.
A member whose channel closes before a claim reaches it tears its VM down.

Only root talks here: the endpoint is 0600 in a root-owned directory. This
module imports no trio: ``start`` claims with :func:`request` and must start
fast; the daemon's and members' side is :class:`shim.pool.channel.Channel`.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shim.errors import HuskError

#: the longest line either side accepts
MAX_LINE = 64 * 1024


class PoolProtocolError(HuskError):
    """A message that is not one JSON object on one line of at most ``MAX_LINE`` bytes."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One line of JSON."""
    return json.dumps(dict(message), separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """The object on ``line``; PoolProtocolError for anything else."""
    try:
        value = json.loads(line)
    except ValueError as e:
        raise PoolProtocolError(f"VM pool: a message that is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise PoolProtocolError("VM pool: a message that is not a JSON object")
    return value


def request(endpoint: Path, message: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the daemon, blocking (``start`` and the CLI are not trio programs).

    OSError when no daemon answers at ``endpoint`` within ``timeout``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(endpoint))
        s.sendall(encode(message))
        data = b""
        while b"\n" not in data:
            chunk = s.recv(MAX_LINE)
            if not chunk:
                raise ConnectionResetError(f"the VM pool at {endpoint} closed without an answer")
            data += chunk
            if len(data) > MAX_LINE:
                raise PoolProtocolError(f"VM pool: an answer longer than {MAX_LINE} bytes")
    return decode(data.partition(b"\n")[0])
