"""Growing and shrinking one sandbox's VM as its containers claim CPU and memory.

The order is the one a container needs: the VM grows first (``Hypervisor.resize``
hot-plugs), the agent brings the new vCPUs (and any memory the kernel left
offline) online with ``OnlineCPUMem``, and only then does the caller set the
container's cgroups (``CreateContainer``, ``UpdateContainer``), so a limit is
never larger than what the guest has.

Shrinking happens after the cgroups no longer need the room (a container
removed, a limit lowered), in the background, and gives back only what the
plugin can take back: memory through virtio-mem; vCPUs only where the plugin
declares ``vcpu_unplug`` (not QEMU 7.2 under TCG), otherwise the extra vCPUs
stay in the VM and the containers' ``cpu.max`` keeps each one to its share.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import trio

from shim.agent.client import AgentClient
from shim.errors import HuskError
from shim.hypervisor import Hypervisor, VmSize
from shim.sandbox.sizing import VmSizing
from ttrpc import RpcError

log = logging.getLogger("husk.sandbox.resize")


class Resizer:
    """The VM's size, kept at what ``VmSizing`` wants; one resize at a time."""

    def __init__(self, sizing: VmSizing, hypervisor: Hypervisor) -> None:
        self.sizing = sizing
        self.hypervisor = hypervisor
        #: what the VM has now (its boot size until the first resize)
        self.size = sizing.base
        #: told the VM's new size after each resize (the sandbox's record, for `husk sandbox ls`)
        self.on_resized: Callable[[VmSize], None] = lambda size: None
        self._lock = trio.Lock()

    async def claim(
        self, agent: AgentClient, container_id: str, limits: VmSize, what: str
    ) -> VmSize | None:
        """Grow the VM for ``container_id``'s new ``limits`` and record them.

        Returns the container's previous claim (to ``restore`` if what follows
        fails). Above a maximum this raises before anything changes.
        """
        async with self._lock:
            target = self.sizing.wanted_with(container_id, limits, what)
            await self._resize(agent, target, shrink=False)
            previous = self.sizing.claims.get(container_id)
            self.sizing.claims[container_id] = limits
        return previous

    def restore(self, container_id: str, previous: VmSize | None) -> None:
        """Put back a container's claim as it was (None: it had none)."""
        if previous is None:
            self.sizing.claims.pop(container_id, None)
        else:
            self.sizing.claims[container_id] = previous

    async def grow(self, agent: AgentClient) -> None:
        """Grow the VM to what the claims want (a clone starts at its template's size)."""
        async with self._lock:
            await self._resize(agent, self.sizing.wanted(), shrink=False)

    async def fit(self, agent: AgentClient) -> None:
        """Give back what the claims no longer need, as far as the plugin can; never raises."""
        async with self._lock:
            try:
                await self._resize(agent, self.sizing.wanted(), shrink=True)
            except (HuskError, RpcError) as e:
                log.warning("sandbox %s: giving resources back: %s", self.sizing.sandbox_id, e)

    async def _resize(self, agent: AgentClient, target: VmSize, *, shrink: bool) -> None:
        caps = self.hypervisor.capabilities()
        have = self.size
        vcpus, memory = have.vcpus, have.memory_mib
        if target.vcpus > vcpus or (shrink and caps.vcpu_unplug):
            vcpus = target.vcpus
        if target.memory_mib > memory or (shrink and caps.memory_unplug):
            memory = target.memory_mib
        if (vcpus, memory) == (have.vcpus, have.memory_mib):
            return
        try:
            self.size = await self.hypervisor.resize(vcpus, memory)
        except BaseException:
            with trio.CancelScope(shield=True), _quietly():
                self.size = await self.hypervisor.size()  # a resize may stop half way
            raise
        log.info(
            "sandbox %s: VM resized from %d vCPUs, %d MiB to %d vCPUs, %d MiB",
            self.sizing.sandbox_id, have.vcpus, have.memory_mib,
            self.size.vcpus, self.size.memory_mib,
        )  # fmt: skip
        self.on_resized(self.size)
        if self.size.vcpus > have.vcpus or self.size.memory_mib > have.memory_mib:
            # memory comes online by itself (memhp_default_state); asking is a harmless fallback
            await agent.online_cpu_mem(
                self.size.vcpus, cpu_only=self.size.memory_mib <= have.memory_mib
            )


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    try:
        yield
    except HuskError as e:
        log.debug("reading the VM's size back: %s", e)
