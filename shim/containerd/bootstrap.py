"""``start``'s stdin and stdout: the one place the shim protocol's version is decided.

What each containerd writes to ``start``'s stdin, and what it accepts back
(read in containerd's ``runtime/v2/shim.go`` ``parseStartResponse`` and
``core/runtime/v2/command.go`` of each release):

==============  ============================================  ==========================
containerd      stdin                                         stdout it accepts
==============  ============================================  ==========================
1.6             the runtime options ``Any``, or nothing       a plain address only
1.7             the same                                      plain, or JSON version 2
2.0 - 2.2       the same                                      plain, or JSON version 2-3
2.3 +           a ``BootstrapParams`` (options in extensions)  plain, JSON, or a
                                                              ``BootstrapResult`` 2-3
==============  ============================================  ==========================

So husk answers in the form it was asked: a ``BootstrapParams`` (containerd
2.3+) gets a ``BootstrapResult`` of version 3 over ttrpc, which makes
containerd call the task service as ``containerd.task.v3.Task`` and reuse a
pod's bootstrap for the pod's other containers instead of running ``start``
for each; anything else gets the plain ``unix://`` address (task API v2),
the one answer 1.6 understands and 1.7 does not refuse (1.7 refuses a version
3). 2.0 - 2.2 write what 1.7 writes, so they are served as 1.7 is: v2 works
on every 2.x. One exception: with ``[runtime] sandbox_model = "container"``
each container has a VM and a shim of its own, so a pod's containers must
not be sent to the pod's shim, and ``start`` answers version 2 (containerd
then runs ``start`` for each). The serving shim answers both task services
whatever ``start`` printed; only this module knows which containerd called.

Telling the two stdin forms apart: both are protobuf, and an ``Any``'s
``type_url`` (1) and ``value`` (2) share their numbers and wire types with
``BootstrapParams``' ``instance_id`` and ``namespace``. An ``Any`` has no other
field, while containerd fills ``BootstrapParams``' version, addresses and
binary (3-9) on every call: a message with any field but 1 and 2 is a
``BootstrapParams``, and so is one whose fields 1 and 2 are exactly ``-id``
and ``-namespace``. A ``BootstrapParams`` whose instance or namespace is not
``-id``'s or ``-namespace``'s fails ``start`` (it was meant for another task).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from agent_proto import bootstrap_pb2
from shim.errors import InvalidArgumentError

#: the task API version ``start`` announces to a containerd that spoke the bootstrap protocol
TASK_API_V3 = 3
PROTOCOL = "ttrpc"
_ANY_FIELDS = frozenset({1, 2})


class BootstrapMismatchError(InvalidArgumentError):
    """containerd's BootstrapParams name another task than ``start``'s flags."""


@dataclass(frozen=True)
class StartInput:
    """What ``start`` learnt from its stdin."""

    #: the runtime options, an encoded ``google.protobuf.Any`` (b"" for none)
    runtime_options: bytes
    #: whether containerd spoke the bootstrap protocol (2.3+)
    bootstrap: bool


def parse(data: bytes, task_id: str, namespace: str) -> StartInput:
    """Read ``start``'s stdin: the legacy options ``Any`` or a ``BootstrapParams``."""
    if not data:
        return StartInput(b"", bootstrap=False)
    fields = _top_level_fields(data)
    if fields is None:
        # not protobuf at all: let the options reader name the problem
        return StartInput(data, bootstrap=False)
    if fields <= _ANY_FIELDS and not _names_this_task(data, task_id, namespace):
        return StartInput(data, bootstrap=False)
    params = bootstrap_pb2.BootstrapParams()
    try:
        params.ParseFromString(data)
    except DecodeError:
        raise InvalidArgumentError(
            "start: stdin is neither runtime options nor a BootstrapParams that decodes"
        ) from None
    if (params.instance_id, params.namespace) != (task_id, namespace):
        raise BootstrapMismatchError(
            f"start: BootstrapParams name task {params.instance_id!r} in namespace "
            f"{params.namespace!r}, but start runs for -id {task_id!r} -namespace {namespace!r}"
        )
    return StartInput(_runtime_options(params), bootstrap=True)


def _names_this_task(data: bytes, task_id: str, namespace: str) -> bool:
    params = bootstrap_pb2.BootstrapParams()
    try:
        params.ParseFromString(data)
    except DecodeError:
        return False
    return (params.instance_id, params.namespace) == (task_id, namespace)


def _runtime_options(params: bootstrap_pb2.BootstrapParams) -> bytes:
    """The options ``Any`` among the extensions (husk's own type; b"" when none)."""
    from shim.containerd.options import OPTIONS_TYPE

    found = [e.value for e in params.extensions if e.value.type_url.endswith(OPTIONS_TYPE)]
    if found:
        return found[0].SerializeToString()
    # an extension of another type is another runtime's options: the reader refuses it
    others = [e.value for e in params.extensions if e.HasField("value")]
    return others[0].SerializeToString() if others else b""


def _top_level_fields(data: bytes) -> frozenset[int] | None:
    """The field numbers of a protobuf message's top level (None if it is not one)."""
    numbers: set[int] = set()
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        if number == 0 or position < 0:
            return None
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 2:
            length, position = _varint(data, position)
            position += length
        elif wire_type == 5:
            position += 4
        else:
            return None  # groups: neither message has any
        if position < 0 or position > len(data):
            return None
        numbers.add(number)
    return frozenset(numbers)


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """(value, next position); position -1 when the varint runs past the end or 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        if position >= len(data):
            return 0, -1
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    return 0, -1


def reply(address: str, start_input: StartInput, pods_share_a_shim: bool = True) -> bytes:
    """What ``start`` prints: a BootstrapResult v3 to a bootstrap caller, else the address.

    ``pods_share_a_shim`` is false under ``sandbox_model = "container"``:
    then even a bootstrap caller gets version 2, so it keeps running ``start``
    for each container of a pod.
    """
    if not (start_input.bootstrap and pods_share_a_shim):
        return address.encode()
    result = bootstrap_pb2.BootstrapResult(version=TASK_API_V3, address=address, protocol=PROTOCOL)
    return result.SerializeToString()
