"""The sandbox's shared directory, laid out as Kata does: host-only ``mounts/``, guest ``shared/``.

The guest reaches host files only through the 9p export of ``shared/``, and
9p with ``security_model=none`` performs the guest's writes as root on the
host. So the host never makes a mount point anywhere the guest can write::

    <state_dir>/<sandbox>/            0700
        mounts/    the host makes every mount point and bind here; a mount of its
                   own (a bind of itself) with nosuid and nodev, its own peer
                   group with shared propagation; never exported
        shared/    a read-only bind of mounts/, its slave: each mount the host
                   makes under mounts/ (a container's rootfs, a volume) appears
                   in shared/ with its own flags (a rootfs stays writable), but
                   no entry of shared/ itself can be created, renamed or removed
                   by anyone, the guest included (EROFS)

Setuid bits and device nodes inside a rootfs reach the guest as they are (the
guest kernel honours them); on the host every such mount is ``nosuid,nodev``
and sits below 0700 directories, so no host user can run or open them.
Both mounts are recorded before they are made; ``cleanup.reclaim`` undoes them.
"""

from __future__ import annotations

from common import mounts
from shim.resources import MOUNT, Resource
from shim.sandbox.state import SandboxState, make_private_dir


def prepare(state: SandboxState) -> None:
    """Make ``mounts/`` and its read-only view ``shared/`` (idempotent)."""
    mounts_dir, shared_dir = state.mounts_dir, state.shared_dir
    if mounts.is_mount_point(shared_dir):
        return
    state.record(Resource(kind=MOUNT, path=str(shared_dir)))
    state.record(Resource(kind=MOUNT, path=str(mounts_dir)))
    make_private_dir(mounts_dir)
    make_private_dir(shared_dir)
    mounts.mount(str(mounts_dir), mounts_dir, "", ["bind", "nosuid", "nodev", "private"])
    mounts.propagate(mounts_dir, "shared")
    mounts.mount(str(mounts_dir), shared_dir, "", ["rbind", "ro", "nosuid", "nodev", "slave"])
