"""One QEMU process: spawned in its own session, its stderr kept in a log file.

QEMU runs as the leader of a new session (so its helpers, e.g. the ``sh -c
cat > file`` of an ``exec:`` migration, share its process group and die with
it) and writes stderr to ``qemu.log`` in the VM's directory, whose last lines
become the message of a ``VmmExitedError``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

from shim.errors import HostError, VmmExitedError

#: how much of the log's end is read for an error message
_TAIL_BYTES = 4096


class QemuProcess:
    """A spawned QEMU: liveness, waiting, signals to its group, the end of its log."""

    def __init__(self, process: trio.Process, log: Path, plugin: str = "qemu") -> None:
        self._process = process
        self.log = log
        self.plugin = plugin
        self.pgid = process.pid

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, log: Path, pass_fds: Sequence[int] = (), plugin: str = "qemu"
    ) -> QemuProcess:
        """Start QEMU; ``pass_fds`` stay open (same numbers) in the child."""
        with open(log, "ab") as out:
            try:
                process = await trio.lowlevel.open_process(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    pass_fds=tuple(pass_fds),
                )
            except OSError as exc:
                raise HostError(
                    f"cannot run {plugin} binary {argv[0]}: {exc.strerror or exc} (key 'path')"
                ) from exc
        return cls(process, log, plugin)

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
        """Wait for QEMU to exit; any number of tasks may wait."""
        return await self._process.wait()

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
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        return "; ".join(kept[-lines:])

    def exited_error(self) -> VmmExitedError:
        """The error saying QEMU is gone, with what it said last."""
        return VmmExitedError(self.plugin, self.returncode, self.stderr_tail())
