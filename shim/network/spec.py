"""Where a container's network lives, read from its OCI runtime spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shim.errors import InvalidArgumentError


def netns_path(spec: Mapping[str, Any]) -> str | None:
    """The path of the network namespace named in ``linux.namespaces``, or None.

    ``spec`` is the parsed ``config.json``. None means there is nothing to
    connect: no network namespace entry (the host's network, which a VM cannot
    share) or one without a path (a fresh namespace with only loopback).
    """
    linux = spec.get("linux") or {}
    if not isinstance(linux, Mapping):
        raise InvalidArgumentError("OCI spec: 'linux' is not an object")
    namespaces = linux.get("namespaces") or []
    if not isinstance(namespaces, list):
        raise InvalidArgumentError("OCI spec: 'linux.namespaces' is not a list")
    for entry in namespaces:
        if isinstance(entry, Mapping) and entry.get("type") == "network":
            path = entry.get("path") or ""
            if not isinstance(path, str):
                raise InvalidArgumentError(
                    f"OCI spec: network namespace path {path!r} is not a string"
                )
            return path or None
    return None
