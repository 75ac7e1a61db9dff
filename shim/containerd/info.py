"""``containerd-shim-husk-v2 -info``: the ``containerd.types.RuntimeInfo`` containerd 2.x asks for.

containerd runs the binary with ``-info`` alone (no id, no bundle) and the
runtime options ``Any`` on stdin, and reads a protobuf ``RuntimeInfo`` from
stdout: for ``ctr plugins inspect-runtime`` and, on 2.2+, before creating a
task whose shim advertised no mount capabilities (once per runtime while
containerd runs). As ``containerd-shim-runc-v2`` answers it: the runtime's
name and version, the options as understood, and an OCI runtime-spec
``features`` document, the JSON ``runc features`` prints, in an ``Any`` of the
type URL containerd registers for it. containerd checks that document before
it sends a spec with idmapped mounts: husk shares the rootfs and volumes
into the VM over 9p/virtio-fs, where an idmap cannot be applied, so it says
idmap is not available and containerd refuses such a task in one line
instead of husk ignoring the mapping.
"""

from __future__ import annotations

import json

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from agent_proto import introspection_pb2
from shim.containerd.options import RuntimeOptionsError, parse
from shim.version import husk_version

RUNTIME_NAME = "io.containerd.husk.v2"
#: containerd's type URL for runtime-spec's ``features.Features`` (spec major version 1)
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
#: the runtime-spec versions husk takes: the guest agent hands its runtime a version
#: that runtime supports; 1.3.0 is what containerd 2.4 writes
OCI_VERSION_MIN = "1.0.0"
OCI_VERSION_MAX = "1.3.0"
#: the mount options husk takes in a spec (runtime-spec's list, as runc's
#: features give it). "rro": the host makes a volume's whole tree read-only
#: before sharing it (shim/sandbox/rootfs.py); containerd's CRI offers
#: recursive read-only mounts only to a runtime that lists it
MOUNT_OPTIONS = (
    "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "iversion",
    "lazytime", "loud", "mand", "noatime", "nodev", "nodiratime", "noexec", "noiversion",
    "nolazytime", "nomand", "norelatime", "nostrictatime", "nosuid", "private", "rbind",
    "relatime", "remount", "ro", "rprivate", "rro", "rshared", "rslave", "runbindable",
    "rw", "shared", "silent", "slave", "strictatime", "suid", "sync", "unbindable",
)  # fmt: skip


def features() -> dict[str, object]:
    """The runtime-spec features document husk stands behind."""
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {"mountExtensions": {"idmap": {"enabled": False}}},
    }


def runtime_info(options: bytes) -> introspection_pb2.RuntimeInfo:
    """The answer to ``-info`` for the runtime options containerd passed (b"" for none)."""
    info = introspection_pb2.RuntimeInfo(
        name=RUNTIME_NAME,
        version=introspection_pb2.RuntimeVersion(version=husk_version()),
        features=any_pb2.Any(type_url=FEATURES_TYPE_URL, value=json.dumps(features()).encode()),
    )
    if options:
        parse(options)  # refuse what start would refuse, in the same words
        wrapper = any_pb2.Any()
        try:
            wrapper.ParseFromString(options)
        except DecodeError:  # pragma: no cover - parse() refused it already
            raise RuntimeOptionsError("runtime options on stdin are not a protobuf Any") from None
        info.options.CopyFrom(wrapper)
    return info
