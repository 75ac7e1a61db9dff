"""Reusable tasks for a connection's unary calls.

Spawning a trio task per request costs about as much as the rest of serving a
small call. The pool keeps finished tasks parked and hands them the next
request, while keeping the one-task-per-call property that matters: a
request is never queued behind another request's handler. ``submit`` gives
each item a worker that is free right now (a parked one or, when none is
parked, a new task in the nursery), so a slow handler delays nobody.

One difference from a fresh task per call: calls served by the same worker
share its ``contextvars`` context (no husk handler uses context variables;
one that sets them must reset them before returning).

Workers belong to the nursery passed in; cancelling it ends them, parked or
busy. ``close()`` lets parked workers exit and busy ones exit when done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

MAX_IDLE_WORKERS = 32
"""Parked workers kept per pool; more exit when they finish, so a burst does not linger."""

Job = Callable[..., Awaitable[None]]


class WorkerPool:
    """Runs submitted coroutine functions on reusable tasks of ``nursery``."""

    def __init__(self, nursery: trio.Nursery, max_idle: int = MAX_IDLE_WORKERS) -> None:
        self._nursery = nursery
        self._max_idle = max_idle
        self._queue: deque[tuple[Job, tuple[Any, ...]]] = deque()
        # parked workers, woken directly: ParkingLot costs ~2x more per wake-up
        self._idle: list[trio.lowlevel.Task] = []
        self._closed = False

    @property
    def idle_workers(self) -> int:
        """Workers parked and waiting for work."""
        return len(self._idle)

    def submit(self, job: Job, *args: Any) -> None:
        """Run ``await job(*args)`` on a worker that is free now."""
        if self._closed:
            raise RuntimeError("worker pool is closed")
        self._queue.append((job, args))
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())
        else:
            self._nursery.start_soon(self._work)

    def close(self) -> None:
        """Accept no more work; parked workers exit, busy ones when they finish."""
        self._closed = True
        while self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    async def _work(self) -> None:
        queue = self._queue
        while True:
            while queue:
                job, args = queue.popleft()
                await job(*args)
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
