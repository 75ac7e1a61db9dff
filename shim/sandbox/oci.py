"""An OCI bundle's ``config.json`` (JSON) → Kata's protobuf form (``oci_pb2``).

The shim reads the bundle; the key-by-key mapping is ``agent_proto.oci_json``,
the one the guest agent uses to write the spec back out for runc. Keys the
protobuf form lacks are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent_proto import oci_pb2
from agent_proto.oci_json import message_from_json
from shim.errors import InvalidArgumentError

Json = dict[str, Any]

#: type URLs containerd uses for JSON-encoded runtime-spec pieces in an ``Any``
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def read_bundle_spec(bundle: str | Path) -> Json:
    """Read ``<bundle>/config.json``; a missing or bad file is InvalidArgument."""
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"bundle {bundle}: no config.json") from None
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"bundle {bundle}: cannot read config.json: {e}") from None
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"bundle {bundle}: config.json is not a JSON object")
    return spec


def spec_from_json(spec: Mapping[str, Any]) -> oci_pb2.Spec:
    """The whole runtime spec."""
    return message_from_json(oci_pb2.Spec, spec, "spec")


def process_from_json(process: Mapping[str, Any]) -> oci_pb2.Process:
    """A ``process`` object (exec'd processes come as one)."""
    return message_from_json(oci_pb2.Process, process, "process")


def resources_from_json(resources: Mapping[str, Any]) -> oci_pb2.LinuxResources:
    """A ``linux.resources`` object (``Update`` sends one)."""
    return message_from_json(oci_pb2.LinuxResources, resources, "resources")
