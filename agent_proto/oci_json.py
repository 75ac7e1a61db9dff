"""The OCI runtime spec between its JSON form (``config.json``) and Kata's protobuf form.

The one mapping both sides of the VM boundary use: the shim reads containerd's
bundle into ``oci_pb2`` with :func:`message_from_json`, the guest agent writes it
back out for runc with :func:`message_to_json`. Both walk the message
descriptors, so a field added to ``oci.proto`` crosses in both directions.

Names. A protobuf field is named after the Go struct field (``UIDMappings``,
``OOMScoreAdj``, ``HostID``); its JSON key is the runtime-spec's struct tag.
:func:`json_name` derives the key by lower-casing the leading run of capitals,
keeping the run's last capital when a lower-case letter follows it
(``UIDMappings`` → ``uidMappings``, ``KernelTCP`` → ``kernelTCP``);
``JSON_NAMES`` holds the few keys that rule gets wrong. Reading JSON matches
keys case-insensitively, as Go's ``encoding/json`` does.

Presence. proto3 cannot tell an unset number from zero, so zero numbers, empty
strings, ``false``, empty lists and maps, and unset messages are left out of
the JSON; runc's Go decoder reads a missing key as that same zero. A message
that is set is written even when empty (``"capabilities": {}`` drops every
capability, no ``capabilities`` keeps the runtime's default). Fields with
presence in the proto (``errnoRet``, a oneof) are written when set, zero or not.
Device-cgroup ``major``/``minor`` use -1 for "absent" (a wildcard), as Kata does,
so that device 0 survives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from common.errors import InvalidArgumentError

Json = dict[str, Any]
M = TypeVar("M", bound=Message)

#: ``Message.Field`` → JSON key, where :func:`json_name`'s rule is wrong
JSON_NAMES: dict[str, str] = {
    "Spec.Version": "ociVersion",
    "LinuxHugepageLimit.Pagesize": "pageSize",
    "LinuxSyscall.errnoret": "errnoRet",
}

#: ``Message.Field`` → the value that stands for "absent" (such a field is
#: written whenever it is not that value, zero included)
ABSENT: dict[str, int] = {
    "LinuxDeviceCgroup.Major": -1,
    "LinuxDeviceCgroup.Minor": -1,
}


def json_name(field: FieldDescriptor) -> str:
    """The runtime-spec JSON key of a field of an ``oci_pb2`` message."""
    explicit = JSON_NAMES.get(_qualified(field))
    if explicit is not None:
        return explicit
    name = field.name
    run = len(name) - len(name.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    if 1 < run < len(name) and name[run].islower():
        run -= 1  # the run's last capital starts the next word: UIDMappings
    return name[:run].lower() + name[run:]


def message_from_json(message: type[M] | M, data: Any, where: str) -> M:
    """Fill a message (or a new one of a message type) from a JSON object.

    Keys the message lacks, and ``null`` values, are skipped. A value of the
    wrong shape raises :class:`InvalidArgumentError` naming ``where`` and the
    key path (``spec.process.args``).
    """
    target = message() if isinstance(message, type) else message
    _fill(target, data, where)
    return target


def message_to_json(message: Message) -> Json:
    """The runtime-spec JSON object of a message (see the module docstring)."""
    out: Json = {}
    for field in _fields_of(message):
        value = getattr(message, field.name)
        if _is_map(field):
            if value:
                out[json_name(field)] = dict(value)
        elif field.is_repeated:
            if value:
                out[json_name(field)] = [_to_json(field, item) for item in value]
        elif field.has_presence:  # a message, or a scalar in a oneof
            if message.HasField(field.name):
                out[json_name(field)] = _to_json(field, value)
        elif _qualified(field) in ABSENT:
            if value != ABSENT[_qualified(field)]:
                out[json_name(field)] = value
        elif value:
            out[json_name(field)] = value
    return out


def _to_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    return value


def _qualified(field: FieldDescriptor) -> str:
    containing = field.containing_type
    return f"{containing.name}.{field.name}" if containing is not None else field.name


def _fields_of(message: Message) -> list[FieldDescriptor]:
    # types-protobuf types DESCRIPTOR as a union with upb's own classes
    descriptor: Any = message.DESCRIPTOR
    return list(descriptor.fields)


def _fill(message: Message, data: Any, where: str) -> None:
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"OCI spec: {where} must be an object, not {type(data).__name__}"
        )
    fields = {json_name(f).lower(): f for f in _fields_of(message)}
    seen = set()
    for key, value in data.items():
        field = fields.get(str(key).lower())
        if field is None or value is None:
            continue
        _set(message, field, value, f"{where}.{key}")
        seen.add(field.name)
    for field in fields.values():
        absent = ABSENT.get(_qualified(field))
        if absent is not None and field.name not in seen:
            setattr(message, field.name, absent)


def _set(message: Message, field: FieldDescriptor, value: Any, where: str) -> None:
    if _is_map(field):
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"OCI spec: {where} must be an object")
        target = getattr(message, field.name)
        for k, v in value.items():
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
                _store(target.append, field, item, f"{where}[{i}]")
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _fill(getattr(message, field.name), value, where)
        getattr(message, field.name).SetInParent()
        return
    _store(lambda v: setattr(message, field.name, v), field, value, where)


def _store(put: Callable[[Any], None], field: FieldDescriptor, value: Any, where: str) -> None:
    try:
        put(_scalar(field, value, where))
    except ValueError:  # protobuf's range check: an int64 in a uint32 field
        raise InvalidArgumentError(f"OCI spec: {where} is out of range: {value!r}") from None


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
