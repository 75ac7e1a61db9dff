"""A helper process of the VM (``cloud-hypervisor``, ``virtiofsd``): spawned, watched, killed.

Each runs as the leader of its own session, with stdout and stderr in a log
file in the VM's directory; the log's last lines become the message of a
``VmmExitedError`` when the process dies while husk still needs it.
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


class HelperProcess:
    """A spawned process: liveness, waiting, signals to its group, the end of its log."""

    def __init__(self, process: trio.Process, log: Path, name: str) -> None:
        self._process = process
        self.log = log
        self.name = name

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, log: Path, name: str, key: str, pass_fds: Sequence[int] = ()
    ) -> HelperProcess:
        """Start ``argv``; ``key`` names the config key of the binary in a start error."""
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
                    f"cannot run {name} binary {argv[0]}: {exc.strerror or exc} (key '{key}')"
                ) from exc
        return cls(process, log, name)

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal)."""
        return self._process.poll()

    @property
    def alive(self) -> bool:
        """Whether it still runs."""
        return self.returncode is None

    async def wait(self) -> int:
        """Wait for it to exit; any number of tasks may wait."""
        return await self._process.wait()

    async def wait_for(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; whether it has exited."""
        with trio.move_on_after(timeout):
            await self.wait()
        return not self.alive

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to its whole process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def kill(self) -> None:
        """SIGKILL the group and reap the process."""
        self.signal_group(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await self.wait()

    async def terminate(self, step: float) -> None:
        """SIGTERM, then SIGKILL after ``step`` seconds; returns once it is reaped."""
        if self.alive:
            self.signal_group(signal.SIGTERM)
            await self.wait_for(step)
        await self.kill()

    def stderr_tail(self, lines: int = 2) -> str:
        """Its last non-empty log lines, joined into one line."""
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
        """The error saying it is gone, with what it said last."""
        return VmmExitedError(self.name, self.returncode, self.stderr_tail())
