"""Host mounts through mount(2)/umount2(2): container rootfs shared into the sandbox."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from shim.errors import HuskError

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}
_IGNORED = {"rw", "defaults", "suid", "dev", "exec"}

_libc = ctypes.CDLL(None, use_errno=True)


class MountError(HuskError):
    """A host mount or unmount failed."""


def split_options(options: Iterable[str]) -> tuple[int, str]:
    """fstab-style options → mount(2) flags and the data string."""
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        elif option and option not in _IGNORED:
            data.append(option)
    return flags, ",".join(data)


def mount(source: str, target: Path, fstype: str, options: Iterable[str] = ()) -> None:
    """Mount ``source`` on ``target``; a read-only bind is remounted read-only."""
    flags, data = split_options(options)
    _call(source, target, fstype, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        _call("", target, "", flags | MS_REMOUNT, "")


def _call(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        source.encode(),
        str(target).encode(),
        fstype.encode() or None,
        ctypes.c_ulong(flags),
        data.encode() or None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"cannot mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}"
        )


def unmount(target: Path | str) -> None:
    """Detach the mount at ``target``; not mounted or missing is fine."""
    rc = _libc.umount2(str(target).encode(), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def mounts_under(directory: Path | str) -> list[str]:
    """Mount points at or below ``directory``, deepest first."""
    prefix = str(directory).rstrip("/")
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = fields[4].replace("\\040", " ")
                    if point == prefix or point.startswith(prefix + "/"):
                        found.append(point)
    except OSError:
        return []
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)
