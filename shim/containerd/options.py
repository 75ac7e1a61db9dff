"""A runtime handler's ``ConfigPath``: which ``configuration.toml`` this shim uses.

containerd's CRI plugin decodes a handler's ``options`` table (``ConfigPath =
"/etc/husk/configuration-template.toml"``) into ``runtimeoptions.v1.Options``, as
it does for Kata, and ``ctr run --runtime-config-path`` fills the same message.
containerd writes it, wrapped in a ``google.protobuf.Any``, to the stdin of the
shim's ``start``; ``delete`` gets no options, so ``start`` records the path in
the bundle for it. No options (plain ``ctr run``) means the usual lookup:
``$HUSK_CONFIG``, ``/etc/husk``, the packaged default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from agent_proto import runtime_options_pb2
from shim.errors import HuskError

#: the bundle file where ``start`` leaves the config path for ``delete``
OPTIONS_FILE = "husk-options.json"
OPTIONS_TYPE = "runtimeoptions.v1.Options"
#: what containerd 2.3+ writes in a bundle whose task joins its pod's shim: the pod's id
SANDBOX_FILE = "sandbox"
#: containerd's options are a few hundred bytes; refuse to buffer more
MAX_OPTIONS_BYTES = 64 * 1024


class RuntimeOptionsError(HuskError):
    """containerd passed runtime options husk cannot use."""


def parse(data: bytes) -> Path | None:
    """The ``ConfigPath`` in an encoded ``Any``; None when no options or none set."""
    if not data:
        return None
    wrapper = any_pb2.Any()
    try:
        wrapper.ParseFromString(data)
    except DecodeError:
        raise RuntimeOptionsError("runtime options on stdin are not a protobuf Any") from None
    name = wrapper.type_url.rsplit("/", 1)[-1]
    if name != OPTIONS_TYPE:
        raise RuntimeOptionsError(
            f"runtime options of type {wrapper.type_url!r}: husk takes {OPTIONS_TYPE} "
            "(a handler's options table with ConfigPath)"
        )
    options = runtime_options_pb2.Options()
    try:
        options.ParseFromString(wrapper.value)
    except DecodeError:
        raise RuntimeOptionsError(f"runtime options: {OPTIONS_TYPE} does not decode") from None
    if not options.config_path:
        return None
    path = Path(options.config_path)
    if not path.is_absolute():
        raise RuntimeOptionsError(f"runtime options: ConfigPath {path} is not an absolute path")
    return path


def read(stream: BinaryIO) -> bytes:
    """What containerd wrote to ``start``'s (or ``-info``'s) stdin; nothing from a terminal."""
    try:
        if os.isatty(stream.fileno()):
            return b""
    except (OSError, ValueError):
        return b""
    data = stream.read(MAX_OPTIONS_BYTES + 1)
    if len(data) > MAX_OPTIONS_BYTES:
        raise RuntimeOptionsError(f"runtime options on stdin exceed {MAX_OPTIONS_BYTES} bytes")
    return data


def record(bundle: str, config_path: Path | None) -> None:
    """Leave the config path in the bundle for ``delete``."""
    target = Path(bundle) / OPTIONS_FILE
    tmp = target.with_name(f".{OPTIONS_FILE}.tmp")
    tmp.write_text(json.dumps({"config_path": str(config_path) if config_path else None}))
    os.replace(tmp, target)


def recorded(bundle: str) -> Path | None:
    """The config path ``start`` recorded in the bundle, if any.

    containerd 2.3+ runs no ``start`` for a container it sends to its pod's
    shim (task API v3); it names the pod in the bundle's ``sandbox`` file, and
    the pod's bundle beside it holds what the pod's ``start`` recorded.
    """
    found, path = _recorded_in(Path(bundle))
    if found:
        return path
    try:
        pod = (Path(bundle) / SANDBOX_FILE).read_text().strip()
    except OSError:
        return None
    if not pod or "/" in pod or pod in (".", ".."):
        return None
    return _recorded_in(Path(bundle).parent / pod)[1]


def _recorded_in(bundle: Path) -> tuple[bool, Path | None]:
    """(whether ``start`` recorded anything in ``bundle``, the config path it recorded)."""
    try:
        value = json.loads((bundle / OPTIONS_FILE).read_text()).get("config_path")
    except (OSError, ValueError, AttributeError):
        return False, None
    return True, Path(value) if isinstance(value, str) and value else None
