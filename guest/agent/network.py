"""Guest networking with the ``ip`` command (busybox's in the guest): links, addresses, routes.

The guest has no netlink library; ``ip -o`` output is stable enough to parse,
and the parsers are pure functions with their own tests. Static neighbours,
which busybox ``ip`` cannot add, go over rtnetlink (``guest.agent.rtnetlink``).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import re
import socket

from agent_proto import agent_pb2, types_pb2
from common.errors import InvalidArgumentError, NotFoundError
from guest.agent import command, netlink, rtnetlink
from guest.agent.reaper import Reaper

log = logging.getLogger("husk.agent.network")

IP = "ip"

_LINK = re.compile(r"^\d+:\s+(?P<name>[^:@\s]+)(?:@\S+)?:\s+<(?P<flags>[^>]*)>(?P<rest>.*)$")
_FLAG_BITS = {
    "UP": 0x1,
    "BROADCAST": 0x2,
    "LOOPBACK": 0x8,
    "POINTOPOINT": 0x10,
    "NOARP": 0x80,
    "PROMISC": 0x100,
    "MULTICAST": 0x1000,
    "LOWER_UP": 0x10000,
}


def parse_links(text: str) -> dict[str, types_pb2.Interface]:
    """Parse ``ip -o link show`` into interfaces keyed by name (no addresses yet)."""
    links: dict[str, types_pb2.Interface] = {}
    for line in text.splitlines():
        match = _LINK.match(line.replace("\\", " "))
        if match is None:
            continue
        name = match["name"]
        words = match["rest"].split()
        iface = types_pb2.Interface(name=name, device=name)
        for i, word in enumerate(words[:-1]):
            if word == "mtu":
                iface.mtu = int(words[i + 1])
            elif word.startswith("link/"):
                iface.type = word.removeprefix("link/")
                iface.hwAddr = words[i + 1] if words[i + 1] != "brd" else ""
        for flag in match["flags"].split(","):
            iface.raw_flags |= _FLAG_BITS.get(flag, 0)
        links[name] = iface
    return links


def parse_addresses(text: str, links: dict[str, types_pb2.Interface]) -> None:
    """Add the addresses of ``ip -o addr show`` to the interfaces in ``links``."""
    for line in text.splitlines():
        words = line.replace("\\", " ").split()
        if len(words) < 4 or words[2] not in ("inet", "inet6"):
            continue
        name = words[1].split("@")[0]
        iface = links.get(name)
        if iface is None:
            continue
        address, _, mask = words[3].partition("/")
        family = types_pb2.IPFamily.v6 if words[2] == "inet6" else types_pb2.IPFamily.v4
        iface.IPAddresses.append(types_pb2.IPAddress(family=family, address=address, mask=mask))


def parse_routes(text: str, family: int) -> list[types_pb2.Route]:
    """Parse ``ip route show`` (one route a line)."""
    routes = []
    scopes = {"universe": 0, "global": 0, "site": 200, "link": 253, "host": 254}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        route = types_pb2.Route(family=family)  # type: ignore[arg-type]
        route.dest = "" if words[0] == "default" else words[0]
        for key, value in itertools.pairwise(words):
            if key == "via":
                route.gateway = value
            elif key == "dev":
                route.device = value
            elif key == "src":
                route.source = value
            elif key == "scope":
                route.scope = scopes.get(value, int(value) if value.isdigit() else 0)
        routes.append(route)
    return routes


_ROUTE_TYPES = frozenset(
    {
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "anycast",
        "unreachable",
        "blackhole",
        "prohibit",
        "throw",
        "nat",
    }
)


def removable_routes(text: str) -> list[list[str]]:
    """Selectors (``DEST [via GW]``) of the routes in ``ip route show dev X`` that
    ``UpdateRoutes`` replaces: all but the kernel's own (``proto kernel``)."""
    selectors = []
    for line in text.splitlines():
        words = line.split()
        if not words or ("proto", "kernel") in itertools.pairwise(words):
            continue
        # a typed route ("unreachable 10.0.0.0/8") keeps its type in the selector
        selector = words[:2] if words[0] in _ROUTE_TYPES and len(words) > 1 else words[:1]
        for key, value in itertools.pairwise(words):
            if key == "via":
                selector += ["via", value]
        selectors.append(selector)
    return selectors


def _prefix(address: types_pb2.IPAddress) -> str:
    try:
        ip = ipaddress.ip_address(address.address)
    except ValueError:
        raise InvalidArgumentError(f"invalid IP address {address.address!r}") from None
    mask = address.mask or ("128" if ip.version == 6 else "32")
    return f"{ip}/{mask}"


class Network:
    """Reads and changes the guest's links, addresses, routes and neighbours."""

    def __init__(self, reaper: Reaper, ip: str = IP) -> None:
        self.reaper = reaper
        self.ip = ip

    async def _ip(self, *args: str) -> str:
        done = await command.run(self.reaper, [self.ip, *args])
        return done.stdout.decode(errors="replace")

    async def list_interfaces(self) -> agent_pb2.Interfaces:
        """Every link with its addresses."""
        links = parse_links(await self._ip("-o", "link", "show"))
        parse_addresses(await self._ip("-o", "addr", "show"), links)
        return agent_pb2.Interfaces(Interfaces=list(links.values()))

    async def list_routes(self) -> agent_pb2.Routes:
        """IPv4 and IPv6 routes of the main table."""
        routes = parse_routes(await self._ip("-4", "route", "show"), types_pb2.IPFamily.v4)
        routes += parse_routes(await self._ip("-6", "route", "show"), types_pb2.IPFamily.v6)
        return agent_pb2.Routes(Routes=routes)

    async def _find_link(self, wanted: types_pb2.Interface) -> str:
        links = parse_links(await self._ip("-o", "link", "show"))
        if wanted.hwAddr:
            for name, link in links.items():
                if link.hwAddr.lower() == wanted.hwAddr.lower():
                    return name
            raise NotFoundError(f"no guest interface has MAC address {wanted.hwAddr}")
        if wanted.name in links:
            return wanted.name
        raise NotFoundError(f"guest interface '{wanted.name}' not found")

    async def update_interface(self, wanted: types_pb2.Interface) -> types_pb2.Interface:
        """Name the link (found by MAC, else name), set MTU and addresses, bring it up."""
        name = await self._find_link(wanted)
        await self._ip("link", "set", "dev", name, "down")
        if wanted.name and wanted.name != name:
            await self._ip("link", "set", "dev", name, "name", wanted.name)
            name = wanted.name
        if wanted.mtu:
            await self._ip("link", "set", "dev", name, "mtu", str(wanted.mtu))
        await self._ip("addr", "flush", "dev", name)
        for address in wanted.IPAddresses:
            await self._ip("addr", "add", _prefix(address), "dev", name)
        await self._ip("link", "set", "dev", name, "up")
        interfaces = await self.list_interfaces()
        for iface in interfaces.Interfaces:
            if iface.name == name:
                return iface
        raise NotFoundError(f"guest interface '{name}' vanished while it was configured")

    async def update_routes(self, routes: list[types_pb2.Route]) -> agent_pb2.Routes:
        """Replace the routes of the links named in ``routes`` with ``routes``.

        The kernel's own routes (``proto kernel``: the subnet of each address,
        IPv6 link-local) stay, as in Kata's agent; a route in ``routes`` with
        the same destination replaces one. Link-scope routes go first so that
        gateways are reachable.
        """
        for device in sorted({r.device for r in routes if r.device}):
            for family in ("-4", "-6"):
                shown = await self._ip(family, "route", "show", "dev", device)
                for selector in removable_routes(shown):
                    try:
                        await self._ip(family, "route", "del", *selector, "dev", device)
                    except command.CommandError as e:
                        log.info("keeping route %s: %s", " ".join(selector), e)
        ordered = sorted(routes, key=lambda r: 0 if not r.gateway else 1)
        for route in ordered:
            args = ["-6"] if route.family == types_pb2.IPFamily.v6 else []
            args += ["route", "replace", route.dest or "default"]
            if route.gateway:
                args += ["via", route.gateway]
            if route.device:
                args += ["dev", route.device]
            if route.source:
                args += ["src", route.source]
            if route.scope:
                args += ["scope", str(route.scope)]
            await self._ip(*args)
        return await self.list_routes()

    async def add_arp_neighbors(self, neighbors: list[types_pb2.ARPNeighbor]) -> None:
        """Add or replace each neighbour (permanent unless it says otherwise).

        Over rtnetlink (``guest.agent.rtnetlink``): busybox ``ip neigh`` cannot add.
        """
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
            try:
                request = rtnetlink.replace_neighbor(
                    socket.if_nametoindex(device),
                    ip,
                    n.lladdr,
                    state=n.state or rtnetlink.NUD_PERMANENT,
                    flags=n.flags,
                )
                with netlink.Socket() as nl:
                    nl.call(request)
            except OSError as e:
                if e.errno == errno.ENODEV or "no interface" in str(e):
                    raise NotFoundError(f"guest interface '{device}' not found") from None
                raise InvalidArgumentError(
                    f"cannot add neighbour {address} ({n.lladdr or 'no lladdr'}) on {device}: "
                    f"{e.strerror or e}"
                ) from None
