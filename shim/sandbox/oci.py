"""An OCI bundle's ``config.json`` (JSON) → Kata's protobuf form (``oci_pb2``).

The shim reads the bundle; the key-by-key mapping is ``agent_proto.oci_json``,
the one the guest agent uses to write the spec back out for runc. Keys the
protobuf form lacks are dropped.

A process whose spec sets no ``oomScoreAdj`` gets the one it would inherit
under runc (:func:`inherited_oom_score_adj`): in the guest it would otherwise
inherit the agent's, which the agent must not hand on.
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
    message = message_from_json(oci_pb2.Spec, spec, "spec")
    process = spec.get("process")
    if isinstance(process, Mapping) and process.get("oomScoreAdj") is None:
        message.Process.OOMScoreAdj = inherited_oom_score_adj()
    return message


def process_from_json(process: Mapping[str, Any]) -> oci_pb2.Process:
    """A ``process`` object (exec'd processes come as one)."""
    message = message_from_json(oci_pb2.Process, process, "process")
    if process.get("oomScoreAdj") is None:
        message.OOMScoreAdj = inherited_oom_score_adj()
    return message


def inherited_oom_score_adj(own: Path = Path("/proc/self/oom_score_adj")) -> int:
    """The ``oom_score_adj`` a runc container's process has when its spec sets none.

    It inherits its shim's, and containerd-shim-runc-v2 sets its own to
    containerd's + 1 (``shim.AdjustOOMScore``, at most 1000). husk's shim keeps
    the score it inherited from containerd, so containerd's is this process's.
    """
    try:
        score = int(own.read_text())
    except (OSError, ValueError):
        return 0
    return max(-1000, min(score + 1, 1000))


def resources_from_json(resources: Mapping[str, Any]) -> oci_pb2.LinuxResources:
    """A ``linux.resources`` object (``Update`` sends one)."""
    return message_from_json(oci_pb2.LinuxResources, resources, "resources")
