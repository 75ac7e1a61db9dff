"""The initramfs archive: cpio "newc" (SVR4, no CRC) written in Python, and read back.

Entries are written in the order given (callers sort them) with fixed owner,
mtime and inode numbers, so identical inputs give a byte-identical archive.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o755``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    mtime: int = 0
    uid: int = 0
    gid: int = 0

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Entry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, namesize: int, filesize: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, filesize,
        0, 0, entry.rdev[0], entry.rdev[1], namesize, 0,
    )  # fmt: skip
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def write(out: BinaryIO, entries: Iterable[Entry]) -> int:
    """Write a newc archive of ``entries`` plus the trailer; returns bytes written."""
    written = 0
    ino = 0
    for entry in [*entries, Entry(_TRAILER, 0)]:
        name = entry.name.lstrip("/").encode() + b"\0"
        ino = ino + 1 if entry.name != _TRAILER else 0
        head = _header(ino, entry, len(name), len(entry.data)) + name
        chunk = head + _pad(len(head)) + entry.data + _pad(len(entry.data))
        out.write(chunk)
        written += len(chunk)
    tail = -written % 512
    out.write(b"\0" * tail)
    return written + tail


def read(data: bytes) -> Iterator[Entry]:
    """Parse a newc archive (used by tests and ``husk image`` checks); stops at the trailer."""
    pos = 0
    while True:
        if data[pos : pos + 6] != _MAGIC:
            raise ValueError(f"bad cpio newc magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, mtime, filesize = fields[1], fields[2], fields[3], fields[5], fields[6]
        namesize = fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == _TRAILER:
            return
        yield Entry(name, mode, body, (fields[9], fields[10]), mtime, uid, gid)
