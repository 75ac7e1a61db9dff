"""Find the interfaces a CNI plugin left in a namespace, with Kata's rules.

Runs inside the namespace (``run_in_netns``) with a pyroute2 ``IPRoute``.
An interface is carried into the VM when it is not loopback, is up and has at
least one address that is not IPv6 link-local (Kata skips unconfigured links
such as ``sit0``/``tunl0`` the same way; the guest makes its own ``fe80::``
address from the same MAC, so copying it would only collide). Of its neighbours
only permanent ones are kept.

Routes differ from Kata in one point: Kata leaves the routes the kernel made
(``proto kernel``, the subnet route of each address) to the guest kernel, but
husk's agent replaces every IPv4 route of a device it is given (``ip route
flush dev``), subnet routes included, so those are sent too (``route
replace`` of an existing route is harmless). IPv6 kernel routes (``fe80::/64``,
prefix routes) are still left to the guest kernel.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from shim.network.errors import UnsupportedInterfaceError
from shim.network.model import (
    NUD_PERMANENT,
    Address,
    LinkInfo,
    Neighbor,
    Route,
    normalize_mac,
)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
RTPROT_KERNEL = 2
RT_TABLE_MAIN = 254
#: link kinds husk can join to a tap with tc redirects
SUPPORTED_KINDS = frozenset({"veth"})


def _addresses(ipr: Any, index: int) -> tuple[Address, ...]:
    found = []
    for msg in ipr.get_addr(index=index):
        # IFA_LOCAL is the interface's own address; on point-to-point links
        # IFA_ADDRESS is the peer's
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if addr is None:
            continue
        if ipaddress.ip_address(addr).is_link_local and msg["family"] == socket.AF_INET6:
            continue
        found.append(Address(addr, int(msg["prefixlen"])))
    return tuple(found)


def _routes(ipr: Any, index: int) -> tuple[Route, ...]:
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if msg.get("RTA_OIF") != index:
                continue
            if msg["proto"] == RTPROT_KERNEL and family == socket.AF_INET6:
                continue
            dst = msg.get("RTA_DST")
            found.append(
                Route(
                    dest=f"{dst}/{msg['dst_len']}" if dst else "",
                    gateway=msg.get("RTA_GATEWAY") or "",
                    source=msg.get("RTA_PREFSRC") or "",
                    scope=int(msg["scope"]),
                    family=int(family),
                )
            )
    return tuple(found)


def _neighbors(ipr: Any, index: int) -> tuple[Neighbor, ...]:
    found = []
    for msg in ipr.get_neighbours(ifindex=index):
        if msg["state"] != NUD_PERMANENT:
            continue
        dst, lladdr = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
        if dst is None or lladdr is None:
            continue
        found.append(Neighbor(dst, normalize_mac(lladdr), msg["state"], msg["flags"]))
    return tuple(found)


def link_info(ipr: Any, msg: Any) -> LinkInfo | None:
    """The interface in one RTM_NEWLINK message, or None if it is not carried."""
    flags = int(msg["flags"])
    if flags & IFF_LOOPBACK or not flags & IFF_UP:
        return None
    index = int(msg["index"])
    addresses = _addresses(ipr, index)
    if not addresses:
        return None
    name = msg.get("IFLA_IFNAME")
    kind = msg.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) or ""
    if kind not in SUPPORTED_KINDS:
        raise UnsupportedInterfaceError(
            f"interface {name} (kind {kind or 'unknown'}) has addresses but husk can "
            f"only carry {', '.join(sorted(SUPPORTED_KINDS))} links into the VM"
        )
    return LinkInfo(
        name=name,
        index=index,
        kind=kind,
        mac=normalize_mac(msg.get("IFLA_ADDRESS")),
        mtu=int(msg.get("IFLA_MTU")),
        flags=flags,
        addresses=addresses,
        routes=_routes(ipr, index),
        neighbors=_neighbors(ipr, index),
    )


def scan_links(ipr: Any) -> list[LinkInfo]:
    """Every interface to carry into the VM, sorted by name (as Kata orders them)."""
    found = [info for msg in ipr.get_links() if (info := link_info(ipr, msg)) is not None]
    return sorted(found, key=lambda info: info.name)
