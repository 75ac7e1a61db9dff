"""One QEMU process: spawned in its own session, its stderr kept in a bounded log.

QEMU runs as the leader of a new session (so its helpers, e.g. the ``sh -c
cat > file`` of an ``exec:`` migration, share its process group and die with
it). QEMU writes its errors and, with ``enable_debug``, its ``-d
guest_errors,unimp`` log to stderr, and a guest decides how much of that there
is: a guest looping on bad device accesses would grow a plain log until
``/run`` is full. So QEMU's stdout and stderr are a pipe that a small process
(``shim/rotating_log.py`` run as a program) copies into ``qemu.log`` in the
VM's directory, rotated at :data:`QEMU_LOG_CAP` bytes (``qemu.log.1``: at most
twice that on disk, as the guest console is kept). The copier ends at EOF,
when QEMU and its helpers (which share its stderr) are gone. The log's last
lines become the message of a ``VmmExitedError``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from shim import rotating_log
from shim.errors import HostError, VmmExitedError
from shim.rotating_log import LOG_CAP, RotatingLog

#: how much of the log's end is read for an error message
_TAIL_BYTES = 4096
#: bytes in each of qemu.log and qemu.log.1
QEMU_LOG_CAP = LOG_CAP
#: how long a reaped QEMU's log copier may take to write its last words
_DRAIN_TIMEOUT = 2.0


class QemuProcess:
    """A spawned QEMU: liveness, waiting, signals to its group, the end of its log."""

    def __init__(
        self,
        process: trio.Process,
        log: Path,
        plugin: str = "qemu",
        copier: trio.Process | None = None,
    ) -> None:
        self._process = process
        self._copier = copier
        self.log = log
        self.plugin = plugin
        self.pgid = process.pid

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, log: Path, pass_fds: Sequence[int] = (), plugin: str = "qemu"
    ) -> QemuProcess:
        """Start QEMU with its stderr copied into ``log``; ``pass_fds`` stay open (same numbers)."""
        read_end, write_end = os.pipe()  # neither inheritable: only the dup2 targets are
        try:
            copier = await trio.lowlevel.open_process(
                # -I -S: a bare interpreter; the script imports only the standard library
                [sys.executable, "-I", "-S", rotating_log.__file__, str(log), str(QEMU_LOG_CAP)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            os.close(read_end)
            read_end = -1
            try:
                process = await trio.lowlevel.open_process(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=write_end,
                    stderr=write_end,
                    start_new_session=True,
                    pass_fds=tuple(pass_fds),
                )
            except OSError as exc:
                os.close(write_end)
                write_end = -1
                with trio.CancelScope(shield=True):
                    await copier.wait()  # EOF at once: nothing else holds the pipe
                raise HostError(
                    f"cannot run {plugin} binary {argv[0]}: {exc.strerror or exc} (key 'path')"
                ) from exc
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
        return cls(process, log, plugin, copier)

    @property
    def pid(self) -> int:
        """QEMU's pid."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once QEMU has exited (negative: killed by that signal)."""
        return self._process.poll()

    @property
    def alive(self) -> bool:
        """Whether QEMU still runs."""
        return self.returncode is None

    async def wait(self) -> int:
        """Wait for QEMU to exit and its log to hold its last words; any number may wait."""
        code = await self._process.wait()
        if self._copier is not None:
            # EOF reaches the copier once QEMU's helpers are gone too; a lingering
            # helper only delays this, never blocks it
            with trio.move_on_after(_DRAIN_TIMEOUT):
                await self._copier.wait()
        return code

    async def wait_for(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; whether QEMU has exited."""
        with trio.move_on_after(timeout):
            await self.wait()
        return not self.alive

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to QEMU's whole process group (QEMU and its helpers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)

    async def kill(self) -> None:
        """SIGKILL the group and reap QEMU."""
        self.signal_group(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await self.wait()

    def stderr_tail(self, lines: int = 2) -> str:
        """QEMU's last non-empty stderr lines, joined into one line."""
        text = RotatingLog(self.log, QEMU_LOG_CAP).tail(_TAIL_BYTES).decode(errors="replace")
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        return "; ".join(kept[-lines:])

    def exited_error(self) -> VmmExitedError:
        """The error saying QEMU is gone, with what it said last."""
        return VmmExitedError(self.plugin, self.returncode, self.stderr_tail())
