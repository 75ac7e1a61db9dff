"""The server's worker pool: reused tasks, never a request queued behind another."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from shim.ttrpc.workers import WorkerPool


async def test_jobs_run_and_workers_are_reused() -> None:
    done: list[int] = []
    tasks: set[trio.lowlevel.Task] = set()

    async def job(n: int) -> None:
        tasks.add(trio.lowlevel.current_task())
        done.append(n)

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery)
        for n in range(3):
            pool.submit(job, n)
            await trio.testing.wait_all_tasks_blocked()
        assert done == [0, 1, 2]
        assert len(tasks) == 1  # one parked worker served all three in turn
        assert pool.idle_workers == 1
        nursery.cancel_scope.cancel()


async def test_a_blocked_job_never_delays_the_next() -> None:
    release = trio.Event()
    done: list[str] = []

    async def slow() -> None:
        await release.wait()
        done.append("slow")

    async def fast() -> None:
        done.append("fast")

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery)
        pool.submit(slow)
        pool.submit(fast)
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["fast"]
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["fast", "slow"]
        nursery.cancel_scope.cancel()


async def test_many_concurrent_jobs_each_get_a_worker() -> None:
    release = trio.Event()
    started = 0

    async def blocked() -> None:
        nonlocal started
        started += 1
        await release.wait()

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery, max_idle=4)
        for _ in range(50):
            pool.submit(blocked)
        await trio.testing.wait_all_tasks_blocked()
        assert started == 50
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.idle_workers == 4  # the rest exited instead of lingering
        nursery.cancel_scope.cancel()


async def test_close_lets_the_nursery_finish() -> None:
    done: list[int] = []

    async def job() -> None:
        await trio.sleep(0)
        done.append(1)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pool = WorkerPool(nursery)
            pool.submit(job)
            pool.submit(job)
            await trio.testing.wait_all_tasks_blocked()
            pool.close()  # parked workers leave; the nursery can close
    assert done == [1, 1]
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(job)


async def test_cancelling_the_nursery_ends_busy_and_parked_workers() -> None:
    async def forever() -> None:
        await trio.sleep_forever()

    async def quick() -> None:
        pass

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pool = WorkerPool(nursery)
            pool.submit(forever)
            pool.submit(quick)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.idle_workers == 1
            nursery.cancel_scope.cancel()
