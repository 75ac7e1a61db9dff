"""mount(2) and umount2(2) through libc, for the shim and the guest agent alike.

The host shares container root filesystems into the sandbox with them; the
agent mounts storages inside the guest (this module is in the initrd).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from common.errors import HuskError

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
#: per-mount flags a bind mount takes only in a remount of its own
_BIND_REMOUNT = MS_RDONLY | 2 | 4 | 8  # ro, nosuid, nodev, noexec
_PROPAGATION = MS_PRIVATE | MS_SLAVE | MS_SHARED

_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "sync": 16,
    "remount": MS_REMOUNT,
    "dirsync": 128,
    "noatime": 1024,
    "nodiratime": 2048,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
    "relatime": 1 << 21,
    "strictatime": 1 << 24,
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
}
#: options that only state mount(2)'s defaults
_IGNORED = {"rw", "suid", "dev", "exec", "async", "atime", "diratime", "defaults"}

_libc = ctypes.CDLL(None, use_errno=True)


class MountError(HuskError):
    """A mount or unmount failed."""


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


def mount(source: str, target: Path | str, fstype: str, options: Iterable[str] = ()) -> None:
    """Mount ``source`` on ``target``.

    mount(2) takes propagation changes, and a bind's ``ro``, ``nosuid``,
    ``nodev`` and ``noexec``, only in calls of their own, so those follow the
    mount as second calls.
    """
    flags, data = split_options(options)
    propagation = flags & _PROPAGATION
    flags &= ~_PROPAGATION
    _call(source, target, fstype, flags, data)
    if flags & MS_BIND and flags & _BIND_REMOUNT:
        _call("", target, "", flags | MS_REMOUNT, "")
    if propagation:
        _call("", target, "", propagation | (flags & MS_REC), "")


def remount_bind(target: Path | str, options: Iterable[str]) -> None:
    """Set a bind mount's ``ro``/``nosuid``/``nodev``/``noexec`` (a remount of its own)."""
    flags, _ = split_options(options)
    _call("", target, "", MS_REMOUNT | MS_BIND | (flags & _BIND_REMOUNT), "")


def propagate(target: Path | str, option: str) -> None:
    """Change the propagation of the mount at ``target`` (``private``, ``rshared``, ...)."""
    flags = _FLAGS[option]
    if not flags & _PROPAGATION:
        raise ValueError(f"{option!r} is not a propagation type")
    _call("", target, "", flags, "")


def _call(source: str, target: Path | str, fstype: str, flags: int, data: str) -> None:
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
            f"cannot mount {fstype or 'bind'} {source or '(remount)'} on {target} "
            f"(flags {flags:#x}, {data or 'no data'}): {os.strerror(err)}"
        )


def is_mount_point(path: Path | str) -> bool:
    """Whether ``path`` is listed in /proc/self/mountinfo."""
    return str(path).rstrip("/") in mounts_under(path)


def unmount(target: Path | str) -> None:
    """Detach the mount at ``target``; not mounted or missing is fine.

    A symlink at ``target`` itself is not followed (``UMOUNT_NOFOLLOW``): what is
    unmounted is the mount at that very path, never where a link points.
    """
    rc = _libc.umount2(str(target).encode(), MNT_DETACH | UMOUNT_NOFOLLOW)
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def mounts_under(directory: Path | str, *, bindable: bool = False) -> list[str]:
    """Mount points at or below ``directory``, deepest first (``bindable``: what a
    recursive bind takes, leaving out mounts marked unbindable and all below them)."""
    prefix = str(directory).rstrip("/")
    found = set()
    unbindable = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = fields[4].replace("\\040", " ")
                    if point != prefix and not point.startswith(prefix + "/"):
                        continue
                    found.add(point)
                    # optional fields run from the 7th to the "-" separator
                    optional = fields[6 : fields.index("-")] if "-" in fields else []
                    if "unbindable" in optional:
                        unbindable.add(point)
    except OSError:
        return []
    if bindable:
        found = {p for p in found if not any(p == u or p.startswith(u + "/") for u in unbindable)}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)
