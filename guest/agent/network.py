"""The guest's links, addresses, routes and neighbours, for the agent's network RPCs.

Everything goes over rtnetlink (:mod:`guest.agent.rtnetlink`, packed by hand:
the guest has no netlink library) in the agent's own network namespace. The
RPCs behave like the ``ip`` commands they replaced: ``UpdateInterface`` is
``ip link set down/name/mtu``, ``ip addr flush``, ``ip addr add`` and ``ip
link set up``; ``UpdateRoutes`` is ``ip route del`` and ``ip route replace``.
A kernel refusal becomes one of husk's typed errors naming the object.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

import trio

from agent_proto import agent_pb2, types_pb2
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    HuskError,
    InvalidArgumentError,
    NotFoundError,
)
from guest.agent import rtnetlink
from guest.agent.netlink import NetlinkError, Socket
from guest.agent.rtnetlink import IP

log = logging.getLogger("husk.agent.network")

_GUEST_FAULTS = frozenset({errno.EPERM, errno.EACCES, errno.ENOMEM, errno.ENOBUFS, errno.EINTR})


def refused(what: str, e: NetlinkError) -> HuskError:
    """The husk error for a kernel refusal of ``what`` ("cannot ... on eth0")."""
    reason = f"{what}: {e.strerror}"
    if e.errno == errno.ENODEV:
        return NotFoundError(reason)
    if e.errno == errno.EEXIST:
        return AlreadyExistsError(reason)
    if e.errno == errno.EBUSY:
        return FailedPreconditionError(reason)
    if e.errno in _GUEST_FAULTS:
        return HuskError(reason)
    return InvalidArgumentError(reason)  # the kernel did not like the values asked for


def _links(nl: Socket) -> list[rtnetlink.Link]:
    return [rtnetlink.parse_link(m.body) for m in nl.call(rtnetlink.get_links())]


def _addresses(nl: Socket, index: int = 0) -> list[rtnetlink.Address]:
    found = [rtnetlink.parse_address(m.body) for m in nl.call(rtnetlink.get_addresses())]
    return [a for a in found if not index or a.index == index]


def _main_routes(nl: Socket, family: int) -> list[rtnetlink.Route]:
    found = [rtnetlink.parse_route(m.body) for m in nl.call(rtnetlink.get_routes(family))]
    return [r for r in found if r.table == rtnetlink.RT_TABLE_MAIN]


def _index_of(links: list[rtnetlink.Link], name: str) -> int:
    for link in links:
        if link.name == name:
            return link.index
    raise NotFoundError(f"guest interface '{name}' not found")


def _interface_pb(link: rtnetlink.Link) -> types_pb2.Interface:
    return types_pb2.Interface(
        name=link.name,
        device=link.name,
        mtu=link.mtu,
        hwAddr=link.address_text,
        type=link.type_name,
        raw_flags=link.flags,
    )


def _family_pb(family: int) -> types_pb2.IPFamily:
    return types_pb2.IPFamily.v6 if family == socket.AF_INET6 else types_pb2.IPFamily.v4


def _ip_address(text: str) -> IP:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgumentError(f"invalid IP address {text!r}") from None


def _address_with_prefix(address: types_pb2.IPAddress) -> tuple[IP, int]:
    ip = _ip_address(address.address)
    mask = address.mask or str(ip.max_prefixlen)
    if not mask.isdigit() or int(mask) > ip.max_prefixlen:
        raise InvalidArgumentError(f"invalid prefix length {mask!r} for address {ip}")
    return ip, int(mask)


def describe_route(route: types_pb2.Route) -> str:
    """A route as ``ip route`` would show it: ``default via 10.0.0.1 dev eth0``."""
    words = [route.dest or "default"]
    for key, value in (("via", route.gateway), ("dev", route.device), ("src", route.source)):
        if value:
            words += [key, value]
    if route.scope:
        words += ["scope", str(route.scope)]
    return " ".join(words)


def route_request(route: types_pb2.Route, index: int) -> rtnetlink.Route:
    """What ``ip route replace`` asks of the kernel for ``route`` (on link ``index``).

    The family is that of the addresses the route names (as ``ip`` infers it),
    else its ``family``. Without a scope a route without a gateway is
    link-scoped, as ``ip`` makes it.
    """
    dst: IP | None = None
    dst_len = 0
    if route.dest and route.dest != "default":
        try:
            network = ipaddress.ip_interface(route.dest)
        except ValueError:
            raise InvalidArgumentError(f"invalid route destination {route.dest!r}") from None
        dst, dst_len = network.ip, network.network.prefixlen
    gateway = _ip_address(route.gateway) if route.gateway else None
    source = _ip_address(route.source) if route.source else None
    named = [a for a in (dst, gateway, source) if a is not None]
    if named:
        family = rtnetlink.family_of(named[0])
    else:
        family = socket.AF_INET6 if route.family == types_pb2.IPFamily.v6 else socket.AF_INET
    if any(rtnetlink.family_of(a) != family for a in named):
        raise InvalidArgumentError(f"route {describe_route(route)} mixes IPv4 and IPv6")
    scope = route.scope or (rtnetlink.RT_SCOPE_UNIVERSE if gateway else rtnetlink.RT_SCOPE_LINK)
    return rtnetlink.Route(
        family=family, dst_len=dst_len, dst=dst, gateway=gateway, oif=index,
        prefsrc=source, scope=scope,
    )  # fmt: skip


def route_pb(route: rtnetlink.Route, names: dict[int, str]) -> types_pb2.Route:
    """A route of a dump as Kata's ``Route``."""
    return types_pb2.Route(
        dest=route.dest_text,
        gateway=str(route.gateway or ""),
        device=names.get(route.oif, ""),
        source=str(route.prefsrc or ""),
        scope=route.scope,
        family=_family_pb(route.family),
    )


class Network:
    """Reads and changes the guest's links, addresses, routes and neighbours.

    Each call opens its own rtnetlink socket and makes its requests without
    yielding to trio in between, so concurrent RPCs do not interleave them.
    """

    async def list_interfaces(self) -> agent_pb2.Interfaces:
        """Every link with its addresses."""
        await trio.lowlevel.checkpoint()
        with Socket() as nl:
            return agent_pb2.Interfaces(Interfaces=self._interfaces(nl))

    def _interfaces(self, nl: Socket) -> list[types_pb2.Interface]:
        interfaces = {link.index: _interface_pb(link) for link in _links(nl)}
        for address in _addresses(nl):
            iface = interfaces.get(address.index)
            if iface is not None and address.ip is not None:
                iface.IPAddresses.append(
                    types_pb2.IPAddress(
                        family=_family_pb(address.family),
                        address=str(address.ip),
                        mask=str(address.prefixlen),
                    )
                )
        return list(interfaces.values())

    async def list_routes(self) -> agent_pb2.Routes:
        """IPv4 and IPv6 routes of the main table."""
        await trio.lowlevel.checkpoint()
        with Socket() as nl:
            return self._routes(nl)

    def _routes(self, nl: Socket) -> agent_pb2.Routes:
        names = {link.index: link.name for link in _links(nl)}
        routes = [
            route_pb(route, names)
            for family in (socket.AF_INET, socket.AF_INET6)
            for route in _main_routes(nl, family)
        ]
        return agent_pb2.Routes(Routes=routes)

    @staticmethod
    def _find_link(nl: Socket, wanted: types_pb2.Interface) -> rtnetlink.Link:
        links = _links(nl)
        if wanted.hwAddr:
            for link in links:
                if link.address_text.lower() == wanted.hwAddr.lower():
                    return link
            raise NotFoundError(f"no guest interface has MAC address {wanted.hwAddr}")
        for link in links:
            if link.name == wanted.name:
                return link
        raise NotFoundError(f"guest interface '{wanted.name}' not found")

    async def update_interface(self, wanted: types_pb2.Interface) -> types_pb2.Interface:
        """Name the link (found by MAC, else name), set MTU and addresses, bring it up."""
        await trio.lowlevel.checkpoint()
        addresses = [_address_with_prefix(a) for a in wanted.IPAddresses]
        if wanted.name and not rtnetlink.valid_link_name(wanted.name):
            raise InvalidArgumentError(f"invalid guest interface name {wanted.name!r}")
        with Socket() as nl:
            link = self._find_link(nl, wanted)
            name = link.name
            self._set(nl, link.index, f"cannot take guest interface {name} down", up=False)
            if wanted.name and wanted.name != name:
                what = f"cannot rename guest interface {name} to {wanted.name}"
                self._set(nl, link.index, what, name=wanted.name)
                name = wanted.name
            if wanted.mtu:
                what = f"cannot set MTU {wanted.mtu} on guest interface {name}"
                self._set(nl, link.index, what, mtu=wanted.mtu)
            self._flush_addresses(nl, link.index, name)
            for ip, prefixlen in addresses:
                try:
                    nl.call(rtnetlink.new_address(link.index, ip, prefixlen))
                except NetlinkError as e:
                    raise refused(f"cannot add address {ip}/{prefixlen} to {name}", e) from None
            self._set(nl, link.index, f"cannot bring guest interface {name} up", up=True)
            for iface in self._interfaces(nl):
                if iface.name == name:
                    return iface
        raise NotFoundError(f"guest interface '{name}' vanished while it was configured")

    @staticmethod
    def _set(
        nl: Socket, index: int, what: str, *, up: bool | None = None, name: str = "", mtu: int = 0
    ) -> None:
        try:
            nl.call(rtnetlink.set_link(index, up=up, name=name, mtu=mtu))
        except NetlinkError as e:
            raise refused(what, e) from None

    @staticmethod
    def _flush_addresses(nl: Socket, index: int, name: str) -> None:
        """``ip addr flush dev NAME``: every address of every family."""
        for address in _addresses(nl, index):
            try:
                nl.call(rtnetlink.del_address(address))
            except NetlinkError as e:
                if e.errno != errno.EADDRNOTAVAIL:  # went with its primary address
                    what = f"cannot remove address {address.ip}/{address.prefixlen} from {name}"
                    raise refused(what, e) from None

    async def update_routes(self, routes: list[types_pb2.Route]) -> agent_pb2.Routes:
        """Replace the routes of the links named in ``routes`` with ``routes``.

        The kernel's own routes (``proto kernel``: the subnet of each address,
        IPv6 link-local) stay, as in Kata's agent; a route in ``routes`` with
        the same destination replaces one. Link-scope routes go first so that
        gateways are reachable.
        """
        await trio.lowlevel.checkpoint()
        with Socket() as nl:
            links = _links(nl)
            devices = sorted({r.device for r in routes if r.device})
            indexes = {device: _index_of(links, device) for device in devices}
            wanted = [route_request(r, indexes.get(r.device, 0)) for r in routes]
            for device in devices:
                self._remove_routes(nl, indexes[device], device)
            ordered = sorted(zip(routes, wanted, strict=True), key=lambda p: bool(p[0].gateway))
            for route, request in ordered:
                try:
                    nl.call(rtnetlink.replace_route(request))
                except NetlinkError as e:
                    raise refused(f"cannot add route {describe_route(route)}", e) from None
            return self._routes(nl)

    @staticmethod
    def _remove_routes(nl: Socket, index: int, device: str) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in _main_routes(nl, family):
                if route.oif != index or route.protocol == rtnetlink.RTPROT_KERNEL:
                    continue
                try:
                    nl.call(rtnetlink.del_route(route))
                except NetlinkError as e:
                    log.info("keeping route %s dev %s: %s", route.dest_text, device, e.strerror)

    async def add_arp_neighbors(self, neighbors: list[types_pb2.ARPNeighbor]) -> None:
        """Add or replace each neighbour (permanent unless it says otherwise)."""
        await trio.lowlevel.checkpoint()
        with Socket() as nl:
            links = _links(nl)
            for n in neighbors:
                address, device = n.toIPAddress.address, n.device
                if not address or not device:
                    raise InvalidArgumentError("an ARP neighbour needs an IP address and a device")
                try:
                    ip = ipaddress.ip_address(address)
                    if n.lladdr:
                        rtnetlink.mac_bytes(n.lladdr)
                except ValueError as e:
                    raise InvalidArgumentError(f"ARP neighbour on {device}: {e}") from None
                state = n.state or rtnetlink.NUD_PERMANENT
                request = rtnetlink.replace_neighbor(
                    _index_of(links, device), ip, n.lladdr, state=state, flags=n.flags
                )
                try:
                    nl.call(request)
                except NetlinkError as e:
                    what = f"cannot add neighbour {address} ({n.lladdr or 'no lladdr'}) on {device}"
                    raise refused(what, e) from None
