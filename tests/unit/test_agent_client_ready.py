"""The shim sees a booting agent as soon as it answers, not a probe's deadline later."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agent_proto import health_pb2
from shim.agent.client import PROBE_INTERVAL, AgentClient
from shim.errors import DeadlineExceededError
from ttrpc.server import Server


class LateHealth:
    """An agent whose channel swallows every request until ``ready_at``."""

    def __init__(self, ready_at: float) -> None:
        self.ready_at = ready_at

    async def Check(
        self, request: health_pb2.CheckRequest, ctx: object
    ) -> health_pb2.HealthCheckResponse:
        if trio.current_time() < self.ready_at:
            await trio.sleep_forever()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _ready_after(ready_at: float, timeout: float) -> float:
    server = Server()
    server.register(health_pb2.DESCRIPTOR.services_by_name["Health"], LateHealth(ready_at))
    host, guest = trio.testing.memory_stream_pair()
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, guest)
        started = trio.current_time()
        try:
            async with AgentClient.open(host) as agent:
                await agent.poll_ready(timeout)
        except Exception as e:
            failure = e
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return trio.current_time() - started


async def test_an_agent_that_starts_answering_is_seen_within_one_probe_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    elapsed = await _ready_after(ready_at=1.05, timeout=10.0)
    assert PROBE_INTERVAL <= 0.1
    assert 1.05 <= elapsed <= 1.05 + 0.1 + 0.01


async def test_an_agent_that_never_answers_fails_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(DeadlineExceededError, match=r"did not answer Health.Check within 2 s"):
        await _ready_after(ready_at=1e9, timeout=2.0)
