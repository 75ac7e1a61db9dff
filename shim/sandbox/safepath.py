"""Path walks that cannot be led out of a directory: ``openat2`` through ctypes.

The guest can write into trees the host later walks (a container's rootfs, and
before husk kept mount points apart, the whole shared dir). A path built from
names the guest can predict must never resolve through a symlink the guest
planted, or climb out with ``..``. Every walk here starts from an fd of a
directory husk owns and resolves each further component with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``:
the kernel refuses a symlink anywhere on the way (ELOOP) and any escape
(EXDEV), instead of husk checking and then using a path (a race).

Mount targets are given to mount(2) as ``/proc/self/fd/<n>`` of an ``O_PATH``
fd opened that way, so what gets mounted on is exactly the directory that was
checked. Removal walks with fds too (``unlinkat`` relative to the parent's fd)
and never crosses into a mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from shim.errors import HuskError

SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: what every walk below a guest-writable tree uses
SAFE_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


class UnsafePathError(HuskError):
    """A path below a guarded directory is a symlink, escapes it, or is not what it should be."""


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = SAFE_RESOLVE) -> int:
    """``openat2(2)``; raises ``OSError`` with the kernel's errno."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _refuse(root: Path, rel: str, e: OSError) -> UnsafePathError:
    why = {
        errno.ELOOP: "a symlink is in the way",
        errno.EXDEV: "it leads out of the directory",
        errno.ENOTDIR: "a component is not a directory",
    }.get(e.errno or 0, e.strerror or str(e))
    return UnsafePathError(f"refusing {root / rel}: {why}")


def _check_rel(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or rel.startswith("/"):
        raise UnsafePathError(f"refusing {rel!r}: not a plain relative path")
    return parts


@contextmanager
def open_dir(root: Path, rel: str = "") -> Iterator[int]:
    """An ``O_PATH`` fd of the directory ``root/rel``, walked without symlinks."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if not _check_rel(rel):
            yield root_fd
            return
        try:
            fd = openat2(root_fd, rel, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise _refuse(root, rel, e) from None
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)


def make_dirs(root: Path, rel: str, mode: int = 0o700) -> None:
    """``mkdir -p root/rel``, one component at a time, never through a symlink."""
    parts = _check_rel(rel)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for part in parts:
            with suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=fd)
            try:
                child = openat2(fd, part, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                raise _refuse(root, rel, e) from None
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def make_file(root: Path, rel: str, mode: int = 0o600) -> None:
    """Create an empty regular file ``root/rel`` (a bind target); the parent must exist."""
    parent, _, name = rel.rpartition("/")
    with open_dir(root, parent) as dir_fd:
        real = os.open(f"/proc/self/fd/{dir_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=real
            )
        except OSError as e:
            raise _refuse(root, rel, e) from None
        finally:
            os.close(real)
        os.close(fd)


@contextmanager
def mount_target(root: Path, rel: str) -> Iterator[str]:
    """A path naming exactly ``root/rel`` (checked), for mount(2): ``/proc/self/fd/<n>``."""
    parent, _, name = rel.rpartition("/")
    with open_dir(root, parent) as dir_fd:
        try:
            fd = openat2(dir_fd, name, os.O_PATH | os.O_NOFOLLOW)
        except OSError as e:
            raise _refuse(root, rel, e) from None
        # O_PATH | O_NOFOLLOW opens a trailing symlink itself instead of failing
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"refusing {root / rel}: a symlink is in the way")
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)


def remove_tree(root: Path, rel: str) -> None:
    """``rm -r root/rel`` by fds: no symlink is followed, no mount point is entered.

    A mount still below raises (EBUSY from rmdir is reported, not walked around).
    """
    parent, _, name = rel.rpartition("/")
    try:
        with open_dir(root, parent) as path_fd:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            dir_fd = os.open(f"/proc/self/fd/{path_fd}", flags)
            try:
                _remove_entry(dir_fd, name, root / rel)
            finally:
                os.close(dir_fd)
    except FileNotFoundError:
        return


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (``mnt_id`` in /proc/self/fdinfo): a bind of a
    directory of the same filesystem has the same ``st_dev``, but its own mount id."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise UnsafePathError(f"no mnt_id for fd {fd}")


def _remove_entry(dir_fd: int, name: str, shown: Path) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if mount_id(fd) != mount_id(dir_fd):
            raise UnsafePathError(f"refusing to remove {shown}: a mount is still there")
        for entry in os.listdir(fd):
            _remove_entry(fd, entry, shown / entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
