"""An OCI bundle's ``config.json`` (JSON) → Kata's protobuf form (``oci_pb2``).

The protobuf messages name their fields after the Go structs (``Args``,
``UIDMappings``, ``OOMScoreAdj``) where the JSON uses the runtime-spec's
camelCase keys (``args``, ``uidMappings``, ``oomScoreAdj``); the two agree once
case is ignored, so the conversion walks the message descriptors and matches
keys case-insensitively. Keys the protobuf form lacks are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from agent_proto import oci_pb2
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
    message = oci_pb2.Spec()
    _fill(message, spec, "spec")
    return message


def process_from_json(process: Mapping[str, Any]) -> oci_pb2.Process:
    """A ``process`` object (exec'd processes come as one)."""
    message = oci_pb2.Process()
    _fill(message, process, "process")
    return message


def resources_from_json(resources: Mapping[str, Any]) -> oci_pb2.LinuxResources:
    """A ``linux.resources`` object (``Update`` sends one)."""
    message = oci_pb2.LinuxResources()
    _fill(message, resources, "resources")
    return message


def _fields(descriptor: Any) -> dict[str, FieldDescriptor]:
    return {f.name.lower(): f for f in descriptor.fields}


def _fill(message: Message, data: Mapping[str, Any], where: str) -> None:
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"OCI spec: {where} must be an object, not {type(data).__name__}"
        )
    fields = _fields(message.DESCRIPTOR)
    for key, value in data.items():
        field = fields.get(key.lower())
        if field is None or value is None:
            continue
        _set(message, field, value, f"{where}.{key}")


def _set(message: Message, field: FieldDescriptor, value: Any, where: str) -> None:
    if _is_map(field):
        target = getattr(message, field.name)
        for k, v in dict(value).items():
            target[str(k)] = str(v)
        return
    if field.is_repeated:
        if not isinstance(value, list):
            raise InvalidArgumentError(f"OCI spec: {where} must be a list")
        target = getattr(message, field.name)
        for i, item in enumerate(value):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                _fill(target.add(), item, f"{where}[{i}]")
            else:
                target.append(_scalar(field, item, f"{where}[{i}]"))
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _fill(getattr(message, field.name), value, where)
        getattr(message, field.name).SetInParent()
        return
    setattr(message, field.name, _scalar(field, value, where))


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    if field.type != FieldDescriptor.TYPE_MESSAGE or entry is None:
        return False
    return bool(entry.GetOptions().map_entry)


_INTS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
}


def _scalar(field: FieldDescriptor, value: Any, where: str) -> Any:
    if field.type in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"OCI spec: {where} must be an integer, not {value!r}")
        if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and value < 0:
            # runtime-spec uses -1 for "unlimited" in a few unsigned Go fields
            return 0
        return value
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool(value)
    if field.type == FieldDescriptor.TYPE_STRING:
        return str(value)
    raise InvalidArgumentError(f"OCI spec: {where} has an unsupported type")
