"""Kata's ``tcfilter`` model: a tap beside the veth, joined by tc redirects.

Each direction is an ingress qdisc with one u32 match-all filter whose action
is ``mirred egress redirect``: frames arriving on the veth leave through the
tap (to the VMM reading it), frames the VMM writes to the tap leave through
the veth. The veth itself keeps its addresses, MAC, MTU and state; only its
ingress qdisc is ours, and only if it had none before (husk refuses a veth
with an ingress qdisc of its own: a match-all redirect would silently bypass
whatever that qdisc's filters do).

Every step records what it is about to create, before creating it, as a
plain dict; ``reclaim`` undoes one record and is idempotent.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import Any

from pyroute2 import IPRoute, protocols
from pyroute2.netlink.exceptions import NetlinkError

from shim.network.errors import NetworkConflictError, NetworkError, NetworkNotFoundError
from shim.network.model import Recorder
from shim.network.netns import run_in_netns

INGRESS_HANDLE = 0xFFFF0000
TC_H_INGRESS = 0xFFFFFFF1
#: classid of the match-all filter; unused by an ingress qdisc, required by u32
_FLOWID = 0x10000
_GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)


def by_index(ipr: Any, index: int) -> Any | None:
    """The link with ``index``, or None once it is gone."""
    try:
        return ipr.get_links(index)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _lookup(ipr: Any, name: str) -> Any | None:
    links = ipr.get_links(ifname=name) if name else []
    return links[0] if links else None


def _has_ingress(ipr: Any, index: int) -> bool:
    return any(
        q["parent"] == TC_H_INGRESS and q["handle"] == INGRESS_HANDLE
        for q in ipr.get_qdiscs(index=index)
    )


def _fail(what: str, netns: str, e: NetlinkError) -> NetworkError:
    return NetworkError(f"{what} in netns {netns} failed: {e.args[-1] if e.args else e}")


def create_tap(ipr: Any, netns: str, name: str, mtu: int, queues: int, record: Recorder) -> int:
    """Create the persistent tap ``name``, up, with the veth's MTU; its ifindex."""
    if _lookup(ipr, name) is not None:
        raise NetworkConflictError(
            f"{name} already exists in netns {netns}; run `husk cleanup` for the sandbox "
            "that left it"
        )
    record({"kind": "tap", "netns": netns, "name": name})
    flags = {"no_pi": True, "one_queue": False, "vnet_hdr": True, "multi_queue": queues > 1}
    try:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=0, gid=0, ifr=flags)
        index = int(ipr.link_lookup(ifname=name)[0])
        ipr.link("set", index=index, mtu=mtu, state="up")
    except NetlinkError as e:
        raise _fail(f"creating tap {name}", netns, e) from None
    return index


def add_redirect(
    ipr: Any, netns: str, source: Any, target_index: int, target_name: str, record: Recorder
) -> None:
    """Ingress qdisc on ``source`` and a match-all redirect to ``target``'s egress."""
    name, index = source.get("IFLA_IFNAME"), int(source["index"])
    try:
        ipr.get_links(index)  # still there? (ENODEV otherwise)
        if _has_ingress(ipr, index):
            raise NetworkConflictError(
                f"interface {name} in netns {netns} already has an ingress qdisc; husk "
                "will not redirect around it (remove it or attach the sandbox elsewhere)"
            )
        record({"kind": "ingress", "netns": netns, "name": name, "ifindex": index})
        ipr.tc("add", "ingress", index)
        ipr.tc(
            "add-filter",
            "u32",
            index,
            parent=INGRESS_HANDLE,
            prio=1,
            protocol=protocols.ETH_P_ALL,
            target=_FLOWID,
            keys=["0x0/0x0+0"],
            action={
                "kind": "mirred",
                "direction": "egress",
                "action": "redirect",
                "ifindex": target_index,
            },
        )
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            raise NetworkNotFoundError(
                f"interface {name} vanished from netns {netns} while husk joined it to "
                f"{target_name}"
            ) from None
        raise _fail(f"redirecting {name} to {target_name}", netns, e) from None


def _reclaim_tap(ipr: Any, entry: Mapping[str, Any]) -> None:
    link = _lookup(ipr, entry["name"])
    # Only a tun/tap of that name is ours: never delete a CNI link.
    if link is None or link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) != "tun":
        return
    try:
        ipr.link("del", index=link["index"])
    except NetlinkError as e:
        if e.code not in _GONE:
            raise


def _reclaim_ingress(ipr: Any, entry: Mapping[str, Any]) -> None:
    link = _lookup(ipr, entry["name"])
    # A link of that name with another index is a new one: not ours to touch.
    if link is None or int(link["index"]) != int(entry.get("ifindex", link["index"])):
        return
    try:
        ipr.tc("del", "ingress", int(link["index"]))
    except NetlinkError as e:
        if e.code not in _GONE:
            raise


_RECLAIMERS: dict[str, Callable[[Any, Mapping[str, Any]], None]] = {
    "tap": _reclaim_tap,
    "ingress": _reclaim_ingress,
}


def is_network_entry(entry: Mapping[str, Any]) -> bool:
    """True for records written by this module (``tap`` and ``ingress`` kinds)."""
    return entry.get("kind") in _RECLAIMERS and "netns" in entry


def reclaim_in(ipr: Any, entry: Mapping[str, Any]) -> None:
    """Undo one record with an ``IPRoute`` already inside its namespace."""
    try:
        _RECLAIMERS[entry["kind"]](ipr, entry)
    except NetlinkError as e:
        raise _fail(f"removing {entry['kind']} {entry.get('name')}", entry["netns"], e) from None


def reclaim(entry: Mapping[str, Any]) -> None:
    """Undo one record; a namespace or object that is already gone is fine.

    Blocking (netlink in a helper thread): call it from a worker thread.
    """
    if not is_network_entry(entry):
        raise ValueError(f"not a network record: {dict(entry)!r}")

    def work() -> None:
        with IPRoute() as ipr:
            reclaim_in(ipr, entry)

    try:
        run_in_netns(entry["netns"], work)
    except NetworkNotFoundError:
        return  # the namespace is gone, and everything that was in it
