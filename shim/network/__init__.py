"""Sandbox networking: the pod's veth joined to a VM NIC through a tap.

Kata's ``tcfilter`` model, with pyroute2: in the pod's network namespace,
each interface a CNI plugin configured gets a tap (``tap0_husk``, …), and tc
ingress redirects join the two; the VM's virtio-net NIC takes the veth's MAC
and MTU, and the guest agent is told the veth's addresses, routes and static
neighbours. The veth itself is not changed.

The sandbox's sequence::

    path = netns_path(config_json)
    plan = await trio.to_thread.run_sync(setup, path, record)   # record: state dir
    for ep in plan.endpoints:
        fds = await trio.to_thread.run_sync(open_tap_fds, plan.netns, ep.tap_name, ep.queues)
        await hypervisor.add_device(ep.device_with_fds(fds))     # then close fds
        await agent.UpdateInterface(UpdateInterfaceRequest(interface=ep.guest_interface()))
    await agent.UpdateRoutes(UpdateRoutesRequest(routes=Routes(Routes=plan.guest_routes())))
    await agent.AddARPNeighbors(... ARPNeighbors(ARPNeighbors=plan.guest_neighbors()))
    ...
    await trio.to_thread.run_sync(teardown, plan)       # or reclaim(entry) per record

Everything here blocks on netlink and is meant for a worker thread; namespace
work happens on short-lived threads of its own (``netns.run_in_netns``).
"""

import importlib
from typing import TYPE_CHECKING

from shim.network.errors import (
    NetworkConflictError,
    NetworkError,
    NetworkNotFoundError,
    UnsupportedInterfaceError,
)
from shim.network.model import (
    Address,
    Endpoint,
    LinkInfo,
    Neighbor,
    NetworkPlan,
    Recorder,
    Route,
    device_id,
    tap_name,
)
from shim.network.spec import netns_path
from shim.network.tapfd import open_tap_fds

if TYPE_CHECKING:
    from shim.network.lifecycle import setup, teardown
    from shim.network.tcfilter import is_network_entry, reclaim

# pyroute2 costs a shim ~8 MiB of memory: only a sandbox that has a pod netns
# (or a cleanup of one) loads the modules that use it.
_NEEDS_PYROUTE2 = {
    "setup": "shim.network.lifecycle",
    "teardown": "shim.network.lifecycle",
    "is_network_entry": "shim.network.tcfilter",
    "reclaim": "shim.network.tcfilter",
}


def __getattr__(name: str) -> object:
    module = _NEEDS_PYROUTE2.get(name)
    if module is None:
        raise AttributeError(f"module 'shim.network' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "Address",
    "Endpoint",
    "LinkInfo",
    "Neighbor",
    "NetworkConflictError",
    "NetworkError",
    "NetworkNotFoundError",
    "NetworkPlan",
    "Recorder",
    "Route",
    "UnsupportedInterfaceError",
    "device_id",
    "is_network_entry",
    "netns_path",
    "open_tap_fds",
    "reclaim",
    "setup",
    "tap_name",
    "teardown",
]
