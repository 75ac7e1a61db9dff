"""The server's worker pool: reused tasks, never a request queued behind another."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ttrpc.workers import WorkerPool


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


async def test_jobs_that_never_wait_run_back_to_back_on_one_task() -> None:
    tasks: list[trio.lowlevel.Task] = []

    async def job() -> None:
        tasks.append(trio.lowlevel.current_task())

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery)
        for _ in range(5):
            pool.submit(job)
        await trio.testing.wait_all_tasks_blocked()
        assert len(tasks) == 5 and len(set(tasks)) == 1
        nursery.cancel_scope.cancel()


async def test_a_job_that_waits_hands_the_queue_to_another_worker() -> None:
    release = trio.Event()
    order: list[str] = []
    tasks: dict[str, trio.lowlevel.Task] = {}

    async def job(name: str, wait: bool) -> None:
        tasks[name] = trio.lowlevel.current_task()
        if wait:
            await release.wait()
        order.append(name)

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(nursery)
        pool.submit(job, "a", False)
        pool.submit(job, "slow", True)
        pool.submit(job, "b", False)
        pool.submit(job, "c", False)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c"]
        assert tasks["slow"] is tasks["a"] and tasks["b"] is not tasks["slow"]
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c", "slow"]
        pool.submit(job, "d", False)  # after all that, work is still picked up
        await trio.testing.wait_all_tasks_blocked()
        assert order[-1] == "d"
        nursery.cancel_scope.cancel()


async def test_values_errors_and_cancellation_reach_a_waiting_job_unchanged() -> None:
    seen: list[object] = []
    send, receive = trio.open_memory_channel[int](1)

    async def receiver() -> None:
        seen.append(await receive.receive())  # a value sent in by trio
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            seen.append("cancelled")
            raise

    async def failing() -> None:
        await trio.sleep(0)
        raise ValueError("after waiting")

    with pytest.raises(ExceptionGroup) as failure:
        async with trio.open_nursery() as nursery:
            pool = WorkerPool(nursery)
            pool.submit(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await send.send(7)
            await trio.testing.wait_all_tasks_blocked()
            pool.submit(failing)
    assert [str(e) for e in failure.value.exceptions] == ["after waiting"]
    assert seen == [7, "cancelled"]


async def test_a_job_failing_without_waiting_does_not_strand_the_queue() -> None:
    done: list[str] = []

    async def bad() -> None:
        raise KeyError("sync failure")

    async def good() -> None:
        done.append("good")

    with pytest.raises(ExceptionGroup) as failure:
        async with trio.open_nursery() as nursery:
            pool = WorkerPool(nursery)
            pool.submit(bad)
            pool.submit(good)
    assert [type(e) for e in failure.value.exceptions] == [KeyError]
    assert done == ["good"]  # the queue was handed on, not stranded
