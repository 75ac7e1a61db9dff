"""The agent's reaper: every child it has, adopted or spawned, is waited for here.

The agent is a child subreaper (or PID 1), so container processes become its
children once ``runc`` exits. One task owns ``waitpid(-1)``: on every SIGCHLD it
reaps all zombies, hands each status to the :class:`ExitWatch` registered for
that pid, and keeps the status of pids nobody watches yet for a while, because a
process adopted from ``runc create`` may die before the agent learns its pid.

Nothing else in the agent may call ``waitpid``: that is why subprocesses are
started through :mod:`guest.agent.command`, never ``trio.run_process``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections import OrderedDict

import trio

log = logging.getLogger("husk.agent.reaper")

SAFETY_TICK = 1.0
"""Seconds between sweeps when no SIGCHLD arrives: a lost signal costs at most this."""


def exit_code(wait_status: int) -> int:
    """Return a ``waitpid`` status as a shell would: the exit code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class ExitWatch:
    """The exit of one child process, awaitable once or many times."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None
        """The exit code (128 + signal when killed); None while running."""
        self._event = trio.Event()

    @property
    def exited(self) -> bool:
        """True once the process has been reaped."""
        return self.status is not None

    def set(self, status: int) -> None:
        """Record the exit code and wake every waiter."""
        self.status = status
        self._event.set()

    async def wait(self) -> int:
        """Block until the process exits; return its exit code."""
        await self._event.wait()
        assert self.status is not None
        return self.status


class Reaper:
    """Reaps every child of this process and dispatches the statuses it knows."""

    def __init__(self, *, retain: int = 1024) -> None:
        self._watches: dict[int, ExitWatch] = {}
        self._unclaimed: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._retain = retain
        self._generation = 0

    @property
    def generation(self) -> int:
        """A counter bumped by every sweep; pass it to :meth:`adopt` as ``since``."""
        return self._generation

    def watch(self, pid: int) -> ExitWatch:
        """Watch a child this task spawned with no checkpoint since.

        Any status kept for an earlier process with the same pid is dropped.
        """
        self._unclaimed.pop(pid, None)
        return self._register(pid)

    def adopt(self, pid: int, since: int) -> ExitWatch:
        """Watch a process that became a child by reparenting.

        ``since`` is :attr:`generation` read before the process was created; a
        status reaped since then for ``pid`` belongs to it and is delivered now.
        """
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and kept[0] > since:
            watch = ExitWatch(pid)
            watch.set(kept[1])
            return watch
        return self._register(pid)

    def _register(self, pid: int) -> ExitWatch:
        existing = self._watches.get(pid)
        if existing is not None:
            return existing
        watch = ExitWatch(pid)
        self._watches[pid] = watch
        return watch

    def forget(self, pid: int) -> None:
        """Stop watching ``pid``; its status, when reaped, is discarded."""
        self._watches.pop(pid, None)

    def dispatch(self, pid: int, wait_status: int) -> None:
        """Deliver one reaped status to its watcher, or keep it unclaimed."""
        code = exit_code(wait_status)
        watch = self._watches.pop(pid, None)
        if watch is not None:
            log.debug("pid %d exited with %d", pid, code)
            watch.set(code)
            return
        log.debug("reaped unwatched pid %d (exit %d)", pid, code)
        self._unclaimed[pid] = (self._generation, code)
        while len(self._unclaimed) > self._retain:
            self._unclaimed.popitem(last=False)

    def sweep(self) -> int:
        """Reap every zombie child now; return how many were reaped."""
        self._generation += 1
        reaped = 0
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            reaped += 1
            self.dispatch(pid, wait_status)
        return reaped

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD (and on a slow tick) until cancelled."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.sweep()
            task_status.started()
            while True:
                with trio.move_on_after(SAFETY_TICK):
                    async for _ in signals:
                        break
                self.sweep()


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to this process; return whether it worked."""
    if os.getpid() == 1:
        return True
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
