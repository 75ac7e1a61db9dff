"""Read-only paths keep the flags of the mount they are in, as runc makes them.

runc binds each of ``linux.readonlyPaths`` onto itself and remounts it
read-only *with* the flags the bind inherited: under ``/proc`` that is
``ro,nosuid,nodev,noexec``. crun 1.8 (the guest's runtime) remounts with
``MS_RDONLY`` alone, which clears ``nosuid,nodev,noexec``. Between ``create``
and ``start`` (no container code has run yet) the agent remounts those paths
once more with the flags of the mount each lies in.

The remount runs in a forked child that enters the container's mount
namespace and root: ``setns(CLONE_NEWNS)`` is refused to a threaded process,
and the child never executes anything from the container's image.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from guest.agent.reaper import Reaper

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
CLONE_NEWNS = 0x00020000
#: statvfs ``f_flag`` bits (ST_*) → mount flags (MS_*) a read-only remount keeps
_KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)


def kept_flags(statvfs_flag: int) -> int:
    """The ``MS_NOSUID``/``MS_NODEV``/``MS_NOEXEC`` of a mount, from its ``statvfs().f_flag``."""
    flags = 0
    for st_flag, ms_flag in _KEPT_FLAGS.items():
        if statvfs_flag & st_flag:
            flags |= ms_flag
    return flags


def _remount_read_only(path: str) -> None:
    """Remount the bind at ``path`` read-only with the flags of the mount around it."""
    try:
        flags = kept_flags(os.statvfs(os.path.dirname(path) or "/").f_flag)
    except FileNotFoundError:
        return
    if not flags:
        return
    target = path.encode()
    if _libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None) != 0:
        error = ctypes.get_errno()
        if error not in (errno.ENOENT, errno.EINVAL):  # absent, or not a mount point
            raise OSError(error, os.strerror(error), path)


def _child(pid: int, paths: Sequence[str]) -> int:
    try:
        root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
        namespace = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        if _libc.setns(namespace, CLONE_NEWNS) != 0:
            return 2
        os.fchdir(root)
        os.chroot(".")
        for path in paths:
            _remount_read_only(path)
    except OSError:
        return 1
    return 0


async def keep_mount_flags(reaper: Reaper, pid: int, paths: Sequence[str]) -> int:
    """Remount ``paths`` in the container whose init is ``pid``; the child's exit status."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only makes syscalls, then exits
        os._exit(_child(pid, paths))
    return await reaper.watch(child).wait()
