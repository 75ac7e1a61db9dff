"""A sandbox's pod network: :mod:`shim.network`'s plan carried into the VM and the guest.

    net = SandboxNetwork(netns, state)
    await net.prepare()                    # taps and redirects in the pod's netns
    ... boot the VM, CreateSandbox ...
    await net.attach(devices, agent)       # hot-add each NIC, configure the guest
    nursery.start_soon(net.serve_port_forwards)   # containerd's port-forward, into the VM
    ...
    await net.teardown()                   # after the VM is destroyed

``prepare`` runs before the VM boots, so a missing namespace or an interface
husk cannot carry fails the start at once, before a VM exists. Every tap and
redirect is written to the sandbox's record (kinds ``net-tap`` and
``net-ingress``) before it is created, so :mod:`shim.sandbox.cleanup` reclaims them
after a crash. Without a namespace path the guest keeps only its loopback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from agent_proto import agent_pb2
from shim import network
from shim.agent.client import AgentClient
from shim.errors import HuskError
from shim.network import Endpoint, NetworkError, NetworkPlan, Recorder
from shim.sandbox import cleanup
from shim.sandbox.devices import DeviceManager
from shim.sandbox.state import SandboxState
from ttrpc import Code, RpcError

log = logging.getLogger("husk.sandbox.network")

#: how long a hot-added NIC may take to show up in the guest
GUEST_NIC_TIMEOUT = 30.0
GUEST_NIC_POLL = 0.05

Setup = Callable[[str | None, Recorder], NetworkPlan]
OpenTapFds = Callable[[str, str, int], list[int]]
Teardown = Callable[[NetworkPlan], None]


class SandboxNetwork:
    """The pod network of one sandbox, from the netns of its spec to the guest's routes.

    ``setup``, ``open_tap_fds`` and ``teardown`` default to :mod:`shim.network`'s
    (blocking, run on worker threads); tests pass fakes.
    """

    def __init__(
        self,
        netns: str | None,
        state: SandboxState,
        *,
        setup: Setup | None = None,
        open_tap_fds: OpenTapFds = network.open_tap_fds,
        teardown: Teardown | None = None,
    ) -> None:
        self.netns = netns
        self.state = state
        self.plan = NetworkPlan()
        # looked up late: shim.network loads pyroute2 only for a sandbox with a netns
        self._setup = setup or (lambda netns, record: network.setup(netns, record))
        self._open_tap_fds = open_tap_fds
        self._teardown = teardown or (lambda plan: network.teardown(plan))

    def _record(self, entry: Mapping[str, Any]) -> None:
        self.state.record(cleanup.network_resource(entry))

    async def prepare(self) -> None:
        """Tap and redirects for each interface in the netns (none without one)."""
        if self.netns is None:
            return
        self.plan = await trio.to_thread.run_sync(self._setup, self.netns, self._record)
        names = ", ".join(ep.link.name for ep in self.plan.endpoints) or "loopback only"
        log.info("sandbox %s: netns %s: %s", self.state.id, self.netns, names)

    async def attach(self, devices: DeviceManager, agent: AgentClient) -> None:
        """Hot-add each NIC, then give the guest its addresses, routes and neighbours."""
        plan = self.plan
        if plan.empty:
            return
        for ep in plan.endpoints:
            await self._hot_add(devices, ep)
            await self._configure(agent, ep)
        try:
            await agent.update_routes(agent_pb2.Routes(Routes=plan.guest_routes()))
            neighbors = plan.guest_neighbors()
            if neighbors:
                await agent.add_arp_neighbors(agent_pb2.ARPNeighbors(ARPNeighbors=neighbors))
        except (RpcError, HuskError) as e:
            raise NetworkError(
                f"routes of netns {plan.netns} in the guest of sandbox {self.state.id}: "
                f"{_reason(e)}"
            ) from None

    async def _hot_add(self, devices: DeviceManager, ep: Endpoint) -> None:
        assert self.plan.netns is not None
        fds = await trio.to_thread.run_sync(
            self._open_tap_fds, self.plan.netns, ep.tap_name, ep.queues
        )
        try:
            await devices.attach(ep.device_with_fds(fds))
        except HuskError as e:
            raise NetworkError(
                f"hot-adding the NIC for {ep.link.name} of netns {self.plan.netns} "
                f"({ep.tap_name}): {_reason(e)}"
            ) from None
        finally:
            _close(fds)  # the VMM holds its own copies now

    async def _configure(self, agent: AgentClient, ep: Endpoint) -> None:
        """``UpdateInterface``, retried until the guest kernel has seen the new NIC."""
        wanted = ep.guest_interface()
        deadline = trio.current_time() + GUEST_NIC_TIMEOUT
        while True:
            try:
                await agent.update_interface(wanted)
                return
            except RpcError as e:
                if _nic_not_there_yet(e) and trio.current_time() < deadline:
                    await trio.sleep(GUEST_NIC_POLL)
                    continue
                raise NetworkError(
                    f"configuring {ep.link.name} (MAC {ep.link.mac}) of netns "
                    f"{self.plan.netns} in the guest: {_reason(e)}"
                ) from None

    def pod_ip(self) -> str | None:
        """The pod's first IPv4 address (what CNI gave its first interface)."""
        for ep in self.plan.endpoints:
            for address in ep.link.addresses:
                if ":" not in address.address:
                    return address.address
        return None

    async def serve_port_forwards(self) -> None:
        """containerd's port-forward into the VM (:mod:`shim.network.portforward`),
        until cancelled. Without it the pod still runs: a failure is logged."""
        pod_ip = self.pod_ip()
        if self.plan.netns is None or pod_ip is None:
            return
        from shim.network import portforward  # iptables and sockets: only with a netns

        try:
            listener = await trio.to_thread.run_sync(portforward.open_listener, self.plan.netns)
        except NetworkError as e:
            log.warning("sandbox %s: no port-forward: %s", self.state.id, e)
            return
        await portforward.serve(listener, pod_ip)

    async def teardown(self) -> None:
        """Remove the taps and redirects (after the VM is gone); the veth stays as it was.

        A failure is logged and left in the record, for ``cleanup.reclaim``.
        """
        plan, self.plan = self.plan, NetworkPlan()
        if not plan.entries:
            return
        try:
            await trio.to_thread.run_sync(self._teardown, plan)
        except NetworkError as e:
            log.warning("sandbox %s: %s", self.state.id, e)
            return
        for entry in plan.entries:
            self.state.forget(cleanup.network_resource(entry))


def _nic_not_there_yet(e: RpcError) -> bool:
    return e.code == Code.NOT_FOUND and "no guest interface has MAC" in e.message


def _reason(e: Exception) -> str:
    text = e.message if isinstance(e, RpcError) else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0]


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
