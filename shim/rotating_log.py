"""A log file of bounded size: ``path`` and ``path.1``, each at most ``cap`` bytes.

What a hostile guest makes the host write can be endless: its serial console,
and QEMU's own messages about the guest's invalid device accesses
(``enable_debug``). A file that grew with it would fill the host's disk (or
``/run``, a tmpfs). Once ``path`` reaches ``cap`` bytes it becomes ``path.1``
(replacing the previous one) and a new ``path`` starts, so at most ``2 * cap``
bytes are on disk and the most recent output is always kept.

It is plain blocking file I/O and imports nothing but the standard library:
run as a program, ``python -I -S rotating_log.py <path> <cap>``, it copies its
stdin into the log until EOF. That is how QEMU's stderr is kept (see
``plugins.qemu.process``): a process of its own, since the driver has no
nursery and QEMU's last words must reach the log even when no task of the
shim reads, that starts in milliseconds with no site-packages (``-S``) and
costs a bare interpreter's memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: bytes in each of ``path`` and ``path.1`` unless told otherwise
LOG_CAP = 1 << 20


class RotatingLog:
    """Appends to ``path``, moving it to ``path.1`` whenever it reaches ``cap`` bytes."""

    def __init__(self, path: Path, cap: int = LOG_CAP) -> None:
        self.path = path
        self.cap = cap
        self.rotated = path.with_name(path.name + ".1")
        self._fd = -1
        #: the log's directory, held open: writes and rotations follow it if it is
        #: renamed (a pool VM's state dir becomes its sandbox's while QEMU logs)
        self._dir_fd = -1
        self._written = 0

    def write(self, data: bytes | bytearray) -> None:
        """Append ``data``, rotating as often as it takes."""
        if self._fd < 0:
            self._fd = self._open()
            self._written = os.fstat(self._fd).st_size
        view = memoryview(data)
        while view:
            room = self.cap - self._written
            if room <= 0:
                os.close(self._fd)
                os.replace(
                    self.path.name,
                    self.rotated.name,
                    src_dir_fd=self._dir_fd,
                    dst_dir_fd=self._dir_fd,
                )
                self._fd, self._written = self._open(), 0
                continue
            done = os.write(self._fd, view[:room])
            self._written += done
            view = view[done:]

    def close(self) -> None:
        """Close the file (a later ``write`` opens it again)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _open(self) -> int:
        if self._dir_fd < 0:
            self._dir_fd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return os.open(
            self.path.name,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=self._dir_fd,
        )

    def tail(self, size: int = 4096) -> bytes:
        """The last ``size`` bytes written, across a rotation."""
        data = b""
        for path in (self.path, self.rotated):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - (size - len(data))))
                    data = f.read() + data
            except OSError:
                continue
            if len(data) >= size:
                break
        return data


def copy(fd: int, log: RotatingLog, chunk: int = 64 * 1024) -> None:
    """Copy ``fd`` into ``log`` until EOF."""
    try:
        while data := os.read(fd, chunk):
            log.write(data)
    finally:
        log.close()


def main(argv: list[str]) -> int:
    """``<log path> <cap in bytes>``: copy stdin into that log until EOF."""
    copy(0, RotatingLog(Path(argv[0]), int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
