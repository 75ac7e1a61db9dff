"""OCI specs for the tests of both sides of the mapping: a real one, and one with every field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

#: what ``ctr run --rootfs --tty --seccomp --memory-limit 268435456 --cpus 1.5
#: --cpu-shares 512 --env FOO=bar --cwd /srv --annotation io.example/a=b --mount
#: type=bind,src=/tmp,dst=/host,options=rbind:ro --device /dev/fuse --read-only
#: --rootfs-propagation rslave ROOTFS ID /bin/sh -c 'sleep 30'`` stored in containerd
#: 1.6.20 (``ctr containers info ID``), as containerd writes it to the bundle
CTR_RUN_SPEC = Path(__file__).parent / "data" / "ctr_run_spec.json"


#: the same ``ctr run`` (an image's rootfs instead of ``--rootfs``, runc as the
#: runtime) in containerd 1.7.24 and 2.1.9 (Debian trixie's and sid's), keyed by
#: version: they write runtime-spec 1.2.0 and 1.2.1
CTR_RUN_SPECS = {
    version: Path(__file__).parent / "data" / f"ctr_run_spec_{version.replace('.', '_')}.json"
    for version in ("1.7.24", "2.1.9")
}


def ctr_run_spec(containerd: str = "1.6.20") -> dict[str, Any]:
    """A fresh copy of the spec ``ctr run`` made in ``containerd`` (see ``CTR_RUN_SPEC``)."""
    path = CTR_RUN_SPECS.get(containerd, CTR_RUN_SPEC)
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def every_field(message_type: type[M]) -> M:
    """A message with every field set to a value that is not its zero."""
    message = message_type()
    fill_every_field(message)
    return message


def fill_every_field(message: Message) -> None:
    """Set every field to a value that is not its zero (recursing into messages)."""
    descriptor: Any = message.DESCRIPTOR
    for field in descriptor.fields:
        target = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            target["k"] = "v"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            item = target.add() if field.is_repeated else target
            fill_every_field(item)
            item.SetInParent()
        elif field.is_repeated:
            target.append(sample(field))
        else:
            setattr(message, field.name, sample(field))


def sample(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_STRING:
        return field.name
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    return field.number + 1
