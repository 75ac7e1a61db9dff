"""Reusable tasks for a connection's unary calls.

Spawning a trio task per request costs about as much as the rest of serving a
small call, and even waking a parked task per request costs a scheduler round.
The pool keeps finished tasks parked and lets one of them, the *drainer*, run
queued requests one after another while their handlers finish without
waiting on anything (the common case: a handler that answers from memory).
The one-task-per-call property that matters is kept: a request is never
queued behind another request's handler. The moment a handler first yields
to trio (it is about to wait), its worker stops being the drainer and hands
the rest of the queue to another worker (a parked one or, when none is
parked, a new task in the nursery), so a slow handler delays nobody.

One difference from a fresh task per call: calls served by the same worker
share its ``contextvars`` context (no husk handler uses context variables;
one that sets them must reset them before returning).

Workers belong to the nursery passed in; cancelling it ends them, parked or
busy. ``close()`` lets parked workers exit and busy ones exit when done.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import trio

MAX_IDLE_WORKERS = 32
"""Parked workers kept per pool; more exit when they finish, so a burst does not linger."""

Job = Callable[..., Coroutine[Any, Any, None]]


class WorkerPool:
    """Runs submitted coroutine functions on reusable tasks of ``nursery``."""

    def __init__(self, nursery: trio.Nursery, max_idle: int = MAX_IDLE_WORKERS) -> None:
        self._nursery = nursery
        self._max_idle = max_idle
        self._queue: deque[tuple[Job, tuple[Any, ...]]] = deque()
        # parked workers, woken directly: ParkingLot costs ~2x more per wake-up
        self._idle: list[trio.lowlevel.Task] = []
        self._closed = False
        self._drainer = False  # a worker is running, or about to run, the queue

    @property
    def idle_workers(self) -> int:
        """Workers parked and waiting for work."""
        return len(self._idle)

    def submit(self, job: Job, *args: Any) -> None:
        """Run ``await job(*args)`` soon, never behind another job that is waiting."""
        if self._closed:
            raise RuntimeError("worker pool is closed")
        self._queue.append((job, args))
        if not self._drainer:
            self._hire()

    def close(self) -> None:
        """Accept no more work; parked workers exit, busy ones when they finish."""
        self._closed = True
        while self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    def _hire(self) -> None:
        """Make a free worker the drainer: a parked one, else a new task."""
        self._drainer = True
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())
        else:
            self._nursery.start_soon(self._work)

    async def _work(self) -> None:
        # a worker starts, and wakes from _park, as the drainer
        queue = self._queue
        waiting = False

        def on_wait() -> None:
            # this job is about to wait: hand the queue to another worker
            nonlocal waiting
            waiting = True
            self._drainer = False
            if queue:
                self._hire()

        while True:
            try:
                while queue and not waiting:
                    job, args = queue.popleft()
                    await _run(job(*args), on_wait)
            except BaseException:
                if not waiting:  # a job failed without waiting: free the role
                    on_wait()
                raise
            if waiting:
                waiting = False  # finished a job that waited: someone else drains
            else:
                self._drainer = False  # drained the queue
            if self._closed or len(self._idle) >= self._max_idle:
                return
            await self._park()

    async def _park(self) -> None:
        task = trio.lowlevel.current_task()
        idle = self._idle
        idle.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            idle.remove(task)  # still listed: every wake-up pops before it reschedules
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


@types.coroutine
def _run(coro: Coroutine[Any, Any, None], on_wait: Callable[[], None]) -> Generator[Any, Any, None]:
    """``await coro``, calling ``on_wait()`` just before it first yields to trio.

    Everything trio sends or throws in is passed through unchanged, so the
    job runs exactly as if awaited directly, in the same task.
    """
    try:
        trap = coro.send(None)
    except StopIteration:
        return
    on_wait()
    while True:
        try:
            value = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                trap = coro.send(value)
            except StopIteration:
                return
