"""Noticing that a sandbox's VM or its guest agent is gone.

Two watchers run in the sandbox's nursery and call ``lose(reason)`` once:
one waits for the VMM process to exit (``Hypervisor.wait``: a ``kill -9`` of
QEMU wakes it at once); the other asks the agent ``Health.Check`` every
``interval`` seconds, and an agent that does not answer within the client's
``request_timeout``, or whose connection broke, is lost too. What losing
means for the tasks is the sandbox's business (``Sandbox._lose``).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from shim.agent.client import AgentClient
from shim.errors import NotSupportedError
from shim.hypervisor import Hypervisor
from ttrpc import RpcError

Lose = Callable[[str], None]


async def watch_vm(hypervisor: Hypervisor, lose: Lose) -> None:
    """Call ``lose`` when the VMM process exits (never, for a plugin that cannot wait)."""
    try:
        status = await hypervisor.wait()
    except NotSupportedError:
        return
    lose(f"the VM exited (VMM status {status})")


async def watch_agent(agent: AgentClient, interval: float, lose: Lose) -> None:
    """Call ``lose`` when ``Health.Check`` fails or gets no answer in ``request_timeout``."""
    while True:
        await trio.sleep(interval)
        try:
            await agent.check()
        except RpcError as e:
            lose(f"the agent stopped answering ({e})")
            return
