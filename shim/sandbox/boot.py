"""Starting a sandbox's VM: a clone of the VM template where there is one, else a cold boot.

Either way the VM starts inside one of the host's boot slots
(:mod:`shim.sandbox.boot_slots`), held until the agent answers, and its
console goes to the sandbox's bounded log from the moment the VMM listens. A
clone that cannot be made (no template, a damaged one, a VMM that refuses
the state) is given up with one line in the log and the VM boots cold
instead: the template only ever makes a start faster, never impossible.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from shim.agent.client import AgentClient, wait_ready
from shim.agent.transport import connect
from shim.errors import HuskError
from shim.hypervisor import AgentEndpoint, Hypervisor, VmSpec
from shim.sandbox.boot_slots import BootSlots, Slot
from shim.sandbox.console import ConsoleLog
from shim.sandbox.state import SandboxState
from shim.sandbox.template import VmTemplate
from ttrpc import TtrpcError

log = logging.getLogger("husk.sandbox.boot")

#: a clone answers in well under a second; one that has not within this is
#: broken (a damaged template file loads but runs nothing) and boots cold instead
CLONE_READY_TIMEOUT = 10.0

Dial = Callable[[AgentEndpoint, float], Awaitable[trio.abc.Stream]]


@dataclass
class BootedVm:
    """A VM that was booted, and its agent connected, before its sandbox existed.

    The VM pool's (:mod:`shim.pool.member`): its state dir has become the
    sandbox's, and the process that started its VMM serves the sandbox.
    """

    #: the pool member it was (its first state dir's name)
    name: str
    hypervisor: Hypervisor
    #: the spec it was started with, its paths at the sandbox's state dir
    spec: VmSpec
    console: ConsoleLog
    agent: AgentClient
    #: the sandbox's state, which the VM's resources are recorded in
    state: SandboxState
    #: a clone of the VM template (else booted cold)
    cloned: bool
    #: ``trio.current_time()`` when its agent first answered
    ready_at: float

    def age(self) -> float:
        """Seconds since it was ready."""
        return trio.current_time() - self.ready_at


class VmLauncher:
    """Starts one sandbox's VM once, and says how (``cloned``)."""

    def __init__(
        self,
        sandbox_id: str,
        hypervisor: Hypervisor,
        spec: VmSpec,
        console: ConsoleLog,
        *,
        boot_timeout: float,
        slots: BootSlots | None = None,
        template: VmTemplate | None = None,
        dial: Dial = connect,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.hypervisor = hypervisor
        self.spec = spec
        self.console = console
        self.boot_timeout = boot_timeout
        self.slots = slots
        self.template = template
        self._dial = dial
        #: whether the VM is a clone of the template (it must then be made unique, and
        #: grown from the template's size to the sandbox's)
        self.cloned = False
        self._slot: Slot | None = None
        #: the spec the VM was started with (a clone's differs in template and size)
        self.spec_started = spec

    async def start(self, nursery: trio.Nursery) -> None:
        """Prepare and start the VM; its console tap runs in ``nursery``.

        The boot slot stays held: call ``release_slot`` once the agent answers.
        """
        if self.template is not None:
            try:
                files = await self.template.ensure()
                vcpus, memory_mib = self.template.size()
                clone = dataclasses.replace(
                    self.spec, template=files, vcpus=vcpus, memory_mib=memory_mib
                )
                await self._start(clone, nursery)
                await self._answers(CLONE_READY_TIMEOUT)
                self.cloned = True
                return
            except (HuskError, TtrpcError) as e:
                log.warning(
                    "sandbox %s: not started from the VM template (%s); booting cold",
                    self.sandbox_id,
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                self.release_slot()
                with trio.CancelScope(shield=True):
                    await self.hypervisor.destroy()
        await self._start(self.spec, nursery)

    async def _start(self, spec: VmSpec, nursery: trio.Nursery) -> None:
        self.spec_started = spec
        await self.hypervisor.prepare(spec)
        socket_path = self.hypervisor.console_socket()
        if socket_path is not None:
            nursery.start_soon(self.console.run, socket_path)
        if self.slots is not None and self._slot is None:
            self._slot = await self.slots.acquire(f"sandbox {self.sandbox_id}")
        await self.hypervisor.start(self.boot_timeout)

    async def _answers(self, timeout: float) -> None:
        """A clone whose guest does not answer soon is no use: fail it (to boot cold)."""
        async with wait_ready(self.hypervisor.agent_endpoint(), timeout, dial=self._dial):
            pass

    def release_slot(self) -> None:
        """The boot is over (the agent answers, or the start failed)."""
        if self._slot is not None:
            self._slot.release()
            self._slot = None
