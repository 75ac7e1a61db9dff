"""QEMU's stderr, copied into a bounded ``qemu.log`` by a small process of its own.

QEMU writes its errors and, with ``enable_debug``, its ``-d guest_errors,unimp``
log to stderr, and a guest decides how much of that there is: a guest looping
on bad device accesses would grow a plain ``qemu.log`` until ``/run`` is full.
So QEMU's stdout and stderr are a pipe, and this module, run as
``python -m plugins.qemu.stderr_log <log> <cap>``, copies the pipe into a
:class:`~shim.rotating_log.RotatingLog` (``qemu.log`` and ``qemu.log.1``, each
at most ``cap`` bytes), as the guest console is kept.

A process, not a task of the shim: the driver has no nursery (see
``plugins.qemu.driver``), and QEMU's last words must reach the log even when
no task of the shim is reading. It ends at EOF, which comes when QEMU and its
helpers (which share its stderr) are gone; it imports nothing but the
rotating log, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shim.rotating_log import RotatingLog

READ_CHUNK = 64 * 1024


def copy(fd: int, log: RotatingLog) -> None:
    """Copy ``fd`` into ``log`` until EOF."""
    try:
        while data := os.read(fd, READ_CHUNK):
            log.write(data)
    finally:
        log.close()


def main(argv: list[str]) -> int:
    """``<log path> <cap in bytes>``: copy stdin into that log."""
    path, cap = Path(argv[0]), int(argv[1])
    copy(sys.stdin.fileno(), RotatingLog(path, cap))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
