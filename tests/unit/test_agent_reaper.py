"""The reaper: statuses reach the process they belong to; others are reaped silently."""

from __future__ import annotations

import os
import signal

import trio

from guest.agent import command
from guest.agent.reaper import Reaper, exit_code


def test_exit_code_is_shell_style() -> None:
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 128 + signal.SIGKILL


def test_dispatch_wakes_the_watcher_of_that_pid_only() -> None:
    reaper = Reaper()
    a, b = reaper.watch(100), reaper.watch(101)
    reaper.dispatch(100, 7 << 8)
    assert a.status == 7
    assert b.status is None
    reaper.dispatch(555, 0)  # an orphan nobody watches: reaped silently
    assert b.status is None


def test_adopt_gets_a_status_reaped_before_it_registered() -> None:
    reaper = Reaper()
    since = reaper.generation
    reaper.sweep()  # bumps the generation, as a real SIGCHLD would
    reaper.dispatch(200, 1 << 8)
    watch = reaper.adopt(200, since)
    assert watch.status == 1


def test_adopt_ignores_a_status_older_than_the_process() -> None:
    reaper = Reaper()
    reaper.sweep()
    reaper.dispatch(300, 1 << 8)  # an earlier process with the same pid
    since = reaper.generation
    watch = reaper.adopt(300, since)
    assert watch.status is None


def test_watch_drops_a_stale_status_of_the_same_pid() -> None:
    reaper = Reaper()
    reaper.dispatch(400, 9)
    assert reaper.watch(400).status is None


def test_unclaimed_statuses_are_bounded() -> None:
    reaper = Reaper(retain=2)
    for pid in (1, 2, 3):
        reaper.dispatch(1000 + pid, 0)
    assert reaper.adopt(1001, -1).status is None
    assert reaper.adopt(1003, -1).status == 0


async def test_real_children_are_reaped_on_sigchld() -> None:
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        exits = command.spawn(reaper, ["sh", "-c", "exit 4"])
        sleeper = command.spawn(reaper, ["sleep", "100"])
        with trio.fail_after(5):
            assert await exits.wait() == 4
        os.kill(sleeper.pid, signal.SIGKILL)
        with trio.fail_after(5):
            assert await sleeper.wait() == 128 + signal.SIGKILL
        nursery.cancel_scope.cancel()
