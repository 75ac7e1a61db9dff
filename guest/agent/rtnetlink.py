"""The rtnetlink messages the agent sends and reads: links, addresses, routes, neighbours.

Each request is a pure function returning a :class:`netlink.Request`; each
reply a dump yields is decoded by a pure function into a small dataclass. The
defaults are iproute2's (``ip addr add``, ``ip route replace``, ``ip neigh
replace``), so the guest behaves as it did when the agent ran ``ip``. Family
headers, from ``<linux/rtnetlink.h>``, ``<linux/if_link.h>`` and friends::

    ifinfomsg  family, type, index, flags, change
    ifaddrmsg  family, prefixlen, flags, scope, index
    rtmsg      family, dst_len, src_len, tos, table, protocol, scope, type, flags
    ndmsg      family, ifindex, state, flags, type
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from guest.agent.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    Request,
    attribute,
    attributes,
    cstring,
)

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
NDA_DST, NDA_LLADDR = 1, 2

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTN_UNICAST = 1
NUD_PERMANENT = 0x80

IFNAMSIZ = 16

_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxHiHBB")
_U32 = struct.Struct("=I")

_ACKED = NLM_F_REQUEST | NLM_F_ACK
_DUMP = NLM_F_REQUEST | NLM_F_DUMP

#: ``ifi_type`` (ARPHRD_*) as ``ip link`` names it after ``link/``
LINK_TYPES = {
    0: "netrom", 1: "ether", 24: "ieee1394", 32: "infiniband", 280: "can", 512: "ppp",
    768: "ipip", 769: "tunnel6", 772: "loopback", 776: "sit", 778: "gre", 801: "ieee802.11",
    823: "ip6gre", 65534: "none", 65535: "void",
}  # fmt: skip
_TUNNELS_WITH_IPV4_ADDRESS = frozenset({768, 776, 778})


def family_of(address: IP) -> int:
    """AF_INET or AF_INET6."""
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _ip(family: int, payload: bytes) -> IP | None:
    if family == socket.AF_INET and len(payload) == 4:
        return ipaddress.IPv4Address(payload)
    if family == socket.AF_INET6 and len(payload) == 16:
        return ipaddress.IPv6Address(payload)
    return None


def _u32(payload: bytes | None) -> int | None:
    return _U32.unpack(payload)[0] if payload is not None and len(payload) == 4 else None


# --- links -------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One ``RTM_NEWLINK`` of a dump: a network interface."""

    index: int
    name: str
    flags: int
    mtu: int
    arphrd: int
    address: bytes = b""

    @property
    def type_name(self) -> str:
        """The link type as ``ip link`` shows it (``ether``, ``loopback``, ``[N]``)."""
        return LINK_TYPES.get(self.arphrd, f"[{self.arphrd}]")

    @property
    def address_text(self) -> str:
        """The link-layer address as ``ip link`` shows it ("" when there is none)."""
        if self.arphrd in _TUNNELS_WITH_IPV4_ADDRESS and len(self.address) == 4:
            return str(ipaddress.IPv4Address(self.address))
        return ":".join(f"{octet:02x}" for octet in self.address)


def get_links() -> Request:
    """``RTM_GETLINK`` dump: every link."""
    return Request(RTM_GETLINK, _DUMP, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))


def parse_link(body: bytes) -> Link:
    """A link from the body of an ``RTM_NEWLINK``."""
    _, arphrd, index, flags, _ = _IFINFOMSG.unpack_from(body)
    found = attributes(body, _IFINFOMSG.size)
    return Link(
        index=index,
        name=cstring(found.get(IFLA_IFNAME, b"")),
        flags=flags,
        mtu=_u32(found.get(IFLA_MTU)) or 0,
        arphrd=arphrd,
        address=found.get(IFLA_ADDRESS, b""),
    )


def valid_link_name(name: str) -> bool:
    """Whether the kernel takes ``name`` for a link (its ``dev_valid_name``)."""
    raw = name.encode()
    return (
        0 < len(raw) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() for c in name)
    )


def set_link(index: int, *, up: bool | None = None, name: str = "", mtu: int = 0) -> Request:
    """``RTM_NEWLINK`` on an existing link: ``ip link set dev X [up|down] [name N] [mtu M]``.

    The kernel renames only a link that is down.
    """
    change = IFF_UP if up is not None else 0
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change)
    if name:
        body += attribute(IFLA_IFNAME, name.encode() + b"\0")
    if mtu:
        body += attribute(IFLA_MTU, _U32.pack(mtu))
    return Request(RTM_NEWLINK, _ACKED, body)


# --- addresses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """One ``RTM_NEWADDR`` of a dump; ``local`` is the address itself, ``peer`` its
    other end on a point-to-point link (the same address otherwise)."""

    family: int
    index: int
    prefixlen: int
    scope: int
    local: IP | None
    peer: IP | None

    @property
    def ip(self) -> IP | None:
        """The address as ``ip addr`` shows it."""
        return self.local or self.peer


def get_addresses(family: int = socket.AF_UNSPEC) -> Request:
    """``RTM_GETADDR`` dump: every address of every link (of one family)."""
    return Request(RTM_GETADDR, _DUMP, _IFADDRMSG.pack(family, 0, 0, 0, 0))


def parse_address(body: bytes) -> Address:
    """An address from the body of an ``RTM_NEWADDR``."""
    family, prefixlen, _, scope, index = _IFADDRMSG.unpack_from(body)
    found = attributes(body, _IFADDRMSG.size)
    return Address(
        family=family,
        index=index,
        prefixlen=prefixlen,
        scope=scope,
        local=_ip(family, found.get(IFA_LOCAL, b"")),
        peer=_ip(family, found.get(IFA_ADDRESS, b"")),
    )


def new_address(index: int, address: IP, prefixlen: int) -> Request:
    """``RTM_NEWADDR``, create exclusively: ``ip addr add ADDRESS/PREFIXLEN dev X``.

    ValueError for a prefix length the family cannot have.
    """
    if not 0 <= prefixlen <= address.max_prefixlen:
        raise ValueError(f"prefix length {prefixlen} is out of range for {address}")
    # iproute2's default: 127/8 is host-scoped, everything else global
    scope = RT_SCOPE_HOST if address.version == 4 and address.packed[0] == 127 else 0
    body = _IFADDRMSG.pack(family_of(address), prefixlen, 0, scope, index)
    body += attribute(IFA_LOCAL, address.packed) + attribute(IFA_ADDRESS, address.packed)
    return Request(RTM_NEWADDR, _ACKED | NLM_F_CREATE | NLM_F_EXCL, body)


def del_address(address: Address) -> Request:
    """``RTM_DELADDR`` of an address a dump returned."""
    body = _IFADDRMSG.pack(address.family, address.prefixlen, 0, address.scope, address.index)
    if address.local is not None:
        body += attribute(IFA_LOCAL, address.local.packed)
    if address.peer is not None:
        body += attribute(IFA_ADDRESS, address.peer.packed)
    return Request(RTM_DELADDR, _ACKED, body)


# --- routes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """A route, as a dump returns it or as the agent asks for it (``dst`` None and
    ``dst_len`` 0: the default route)."""

    family: int
    dst_len: int = 0
    dst: IP | None = None
    gateway: IP | None = None
    oif: int = 0
    prefsrc: IP | None = None
    scope: int = RT_SCOPE_UNIVERSE
    table: int = RT_TABLE_MAIN
    protocol: int = RTPROT_BOOT
    type: int = RTN_UNICAST
    tos: int = 0
    priority: int | None = None

    @property
    def dest_text(self) -> str:
        """The destination as ``ip route`` shows it, "" for the default route
        (``10.0.0.0/24``; a host route without its ``/32``)."""
        if self.dst is None:
            return ""
        if self.dst_len == self.dst.max_prefixlen:
            return str(self.dst)
        return f"{self.dst}/{self.dst_len}"


def get_routes(family: int) -> Request:
    """``RTM_GETROUTE`` dump: the routes of every table, of one family."""
    return Request(RTM_GETROUTE, _DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))


def parse_route(body: bytes) -> Route:
    """A route from the body of an ``RTM_NEWROUTE``."""
    family, dst_len, _, tos, table, protocol, scope, kind, _ = _RTMSG.unpack_from(body)
    found = attributes(body, _RTMSG.size)
    return Route(
        family=family,
        dst_len=dst_len,
        dst=_ip(family, found.get(RTA_DST, b"")),
        gateway=_ip(family, found.get(RTA_GATEWAY, b"")),
        oif=_u32(found.get(RTA_OIF)) or 0,
        prefsrc=_ip(family, found.get(RTA_PREFSRC, b"")),
        scope=scope,
        table=_u32(found.get(RTA_TABLE)) or table,
        protocol=protocol,
        type=kind,
        tos=tos,
        priority=_u32(found.get(RTA_PRIORITY)),
    )


def _route_body(route: Route) -> bytes:
    small_table = route.table if route.table < 256 else 0
    body = _RTMSG.pack(
        route.family, route.dst_len, 0, route.tos, small_table,
        route.protocol, route.scope, route.type, 0,
    )  # fmt: skip
    for kind, value in (
        (RTA_DST, route.dst),
        (RTA_GATEWAY, route.gateway),
        (RTA_PREFSRC, route.prefsrc),
    ):
        if value is not None:
            if family_of(value) != route.family:
                raise ValueError(f"{value} is not of the route's address family")
            body += attribute(kind, value.packed)
    if route.oif:
        body += attribute(RTA_OIF, _U32.pack(route.oif))
    if route.priority is not None:
        body += attribute(RTA_PRIORITY, _U32.pack(route.priority))
    return body + attribute(RTA_TABLE, _U32.pack(route.table))


def replace_route(route: Route) -> Request:
    """``RTM_NEWROUTE``, create or replace: ``ip route replace``.

    ValueError when an address is not of the route's family.
    """
    return Request(RTM_NEWROUTE, _ACKED | NLM_F_CREATE | NLM_F_REPLACE, _route_body(route))


def del_route(route: Route) -> Request:
    """``RTM_DELROUTE`` of a route a dump returned (matched on its key fields)."""
    return Request(RTM_DELROUTE, _ACKED, _route_body(route))


# --- neighbours --------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` as 6 bytes; ValueError for anything else."""
    octets = mac.strip().split(":")
    if len(octets) != 6 or not all(len(o) == 2 for o in octets):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(o, 16) for o in octets)


def replace_neighbor(
    index: int, address: IP, lladdr: str = "", *, state: int = NUD_PERMANENT, flags: int = 0
) -> Request:
    """``RTM_NEWNEIGH``, create or replace: ``ip neigh replace ADDR lladdr MAC dev X``.

    ValueError for a malformed MAC address.
    """
    body = _NDMSG.pack(family_of(address), 0, index, state or NUD_PERMANENT, flags, 0)
    body += attribute(NDA_DST, address.packed)
    if lladdr:
        body += attribute(NDA_LLADDR, mac_bytes(lladdr))
    return Request(RTM_NEWNEIGH, _ACKED | NLM_F_CREATE | NLM_F_REPLACE, body)
