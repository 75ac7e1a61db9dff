"""Build and take down the network of one sandbox.

``setup`` scans the pod's namespace, and for each interface creates a tap
and the two tc redirects, recording each object before creating it; on any
failure it undoes what it made and raises one typed error. ``teardown``
undoes a plan. Both block on netlink: call them from a worker thread
(``await trio.to_thread.run_sync(setup, path, record)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shim.hypervisor import NetDevice
from shim.network.errors import NetworkError, NetworkNotFoundError
from shim.network.model import Endpoint, LinkInfo, NetworkPlan, Recorder, device_id, tap_name
from shim.network.netns import run_in_netns
from shim.network.scan import scan_links
from shim.network.tcfilter import add_redirect, by_index, create_tap, reclaim_in


def _connect(
    ipr: Any, netns: str, position: int, link: LinkInfo, queues: int, record: Recorder
) -> Endpoint:
    tap = tap_name(position)
    veth = by_index(ipr, link.index)
    if veth is None or veth.get("IFLA_IFNAME") != link.name:
        raise NetworkNotFoundError(f"interface {link.name} vanished from netns {netns}")
    tap_index = create_tap(ipr, netns, tap, link.mtu, queues, record)
    add_redirect(ipr, netns, veth, tap_index, tap, record)
    add_redirect(ipr, netns, ipr.get_links(tap_index)[0], link.index, link.name, record)
    device = NetDevice(id=device_id(position), mac=link.mac, tap_name=tap, mtu=link.mtu)
    return Endpoint(link=link, tap_name=tap, device=device, queues=queues)


def _build(netns: str, record: Recorder, queues: int) -> NetworkPlan:
    entries: list[Mapping[str, Any]] = []

    def remember(entry: dict[str, Any]) -> None:
        record(dict(entry))
        entries.append(entry)

    with IPRoute() as ipr:
        try:
            links = scan_links(ipr)
            endpoints = tuple(
                _connect(ipr, netns, i, link, queues, remember) for i, link in enumerate(links)
            )
        except NetlinkError as e:
            _undo(ipr, entries)
            reason = e.args[-1] if e.args else e
            raise NetworkError(f"network setup in netns {netns} failed: {reason}") from None
        except BaseException:
            _undo(ipr, entries)
            raise
    return NetworkPlan(netns=netns, endpoints=endpoints, entries=tuple(entries))


def _undo(ipr: Any, entries: list[Mapping[str, Any]]) -> None:
    for entry in reversed(entries):
        # keep undoing past a failure; the record stays for `husk cleanup`
        with contextlib.suppress(NetworkError):
            reclaim_in(ipr, entry)


def setup(netns: str | None, record: Recorder, queues: int = 1) -> NetworkPlan:
    """Carry every CNI interface in ``netns`` into the VM; the plan to hot-add.

    ``netns`` None (no namespace in the spec) gives an empty plan, as does a
    namespace with nothing but loopback. ``record`` is called with each
    object's record before the object is created, so a crash leaves nothing
    ``reclaim`` cannot find; it runs on the helper thread inside the pod's
    namespace, so it should only write the record. On failure everything
    created is removed again (its records stay: ``reclaim`` of them is a no-op).
    """
    if netns is None:
        return NetworkPlan()
    return run_in_netns(netns, lambda: _build(netns, record, queues))


def teardown(plan: NetworkPlan) -> None:
    """Remove everything ``setup`` made for ``plan``; the CNI's veth stays as it was."""
    if plan.netns is None or not plan.entries:
        return
    netns = plan.netns

    def work() -> None:
        with IPRoute() as ipr:
            for entry in reversed(plan.entries):
                reclaim_in(ipr, entry)

    try:
        run_in_netns(netns, work)
    except NetworkNotFoundError:
        return  # the namespace went first, and took our taps with it
