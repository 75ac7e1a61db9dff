"""The guest agent's networking against a real kernel, in a network namespace (root, no VM).

The agent's :class:`Network` runs on a thread that has entered a fresh
namespace, as it would run inside the VM, and iproute2 checks what it did. The
namespace holds a veth end with a made-up name and MAC (the "hot-added NIC" to
find by MAC), its peer in the host namespace with the gateway address, and a
second veth pair whose ``eth1`` is in the way of a rename.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio

from agent_proto import types_pb2
from common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from guest.agent.network import Network
from shim.network.netns import run_in_netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, veth)"),
]

T = TypeVar("T")


@dataclass
class Guest:
    """A namespace standing in for the guest; ``nic`` is the link to find by ``mac``."""

    name: str
    path: str
    nic: str
    mac: str
    host_ip: str
    guest_ip: str
    subnet: int

    def ip(self, *args: str) -> str:
        """iproute2 inside the namespace; its stdout."""
        done = subprocess.run(
            ["ip", "-n", self.name, *args], check=True, capture_output=True, text=True
        )
        return done.stdout

    def ip_json(self, *args: str) -> Any:
        return json.loads(self.ip("-j", *args) or "[]")

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(*args)`` on trio, on a thread inside the namespace, as the agent would."""
        return run_in_netns(self.path, lambda: trio.run(fn, *args))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def guest() -> Iterator[Guest]:
    tag = uuid.uuid4().hex[:6]
    name, host, nic = f"husk-nl-{tag}", f"hn{tag}", f"nic{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    host_ip, guest_ip = f"10.214.{subnet}.1", f"10.214.{subnet}.2"
    mac = f"02:42:0a:d6:{subnet:02x}:02"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host, "type", "veth", "peer", "name", nic, "netns", name)
        _ip("addr", "add", f"{host_ip}/24", "dev", host)
        _ip("link", "set", host, "up")
        _ip("-n", name, "link", "set", nic, "address", mac)
        _ip("-n", name, "addr", "add", f"10.214.{subnet}.99/24", "dev", nic)  # to be flushed
        _ip("-n", name, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
        yield Guest(name, f"/var/run/netns/{name}", nic, mac, host_ip, guest_ip, subnet)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host], capture_output=True, check=False)


def wanted(guest: Guest, **overrides: Any) -> types_pb2.Interface:
    """The ``UpdateInterface`` the shim would send for the NIC (MAC in upper case)."""
    values: dict[str, Any] = {
        "name": "eth0",
        "device": "eth0",
        "hwAddr": guest.mac.upper(),
        "mtu": 1400,
        "IPAddresses": [
            types_pb2.IPAddress(address=guest.guest_ip, mask="24"),
            types_pb2.IPAddress(
                address=f"fd00:{guest.subnet:x}::2", mask="64", family=types_pb2.IPFamily.v6
            ),
        ],
    }
    values.update(overrides)
    return types_pb2.Interface(**values)


def configure(guest: Guest) -> types_pb2.Interface:
    return guest.run(Network().update_interface, wanted(guest))


def test_update_interface_finds_the_nic_by_mac(guest: Guest) -> None:
    iface = configure(guest)
    assert (iface.name, iface.hwAddr, iface.mtu, iface.type) == ("eth0", guest.mac, 1400, "ether")
    assert iface.raw_flags & 0x1  # IFF_UP
    (link,) = guest.ip_json("link", "show", "dev", "eth0")
    assert (link["address"], link["mtu"]) == (guest.mac, 1400)
    assert "UP" in link["flags"]
    assert guest.nic not in guest.ip("-o", "link")  # renamed, not copied
    addresses = guest.ip("-o", "addr", "show", "dev", "eth0")
    assert f"inet {guest.guest_ip}/24 " in addresses
    assert f"inet6 fd00:{guest.subnet:x}::2/64 " in addresses
    assert f"10.214.{guest.subnet}.99" not in addresses  # flushed
    got = {(a.address, a.mask) for a in iface.IPAddresses}
    assert {(guest.guest_ip, "24"), (f"fd00:{guest.subnet:x}::2", "64")} <= got


def test_update_interface_again_is_idempotent(guest: Guest) -> None:
    configure(guest)
    iface = guest.run(Network().update_interface, wanted(guest, mtu=1300))
    assert iface.mtu == 1300
    assert guest.ip("-o", "-4", "addr", "show", "dev", "eth0").count("inet ") == 1


NOT_THERE = "no guest interface has MAC address 02:00:00:00:00:77"
"""What the shim's pod network retries on while a hot-added NIC is not in the guest yet."""


def test_a_mac_no_link_has_is_the_not_found_the_shim_retries_on(guest: Guest) -> None:
    with pytest.raises(NotFoundError, match=f"^{re.escape(NOT_THERE)}$"):
        guest.run(Network().update_interface, wanted(guest, hwAddr="02:00:00:00:00:77"))
    assert guest.nic in guest.ip("-o", "link")  # untouched


def test_refusals_name_the_object(guest: Guest) -> None:
    with pytest.raises(AlreadyExistsError, match=f"rename guest interface {guest.nic} to eth1"):
        guest.run(Network().update_interface, wanted(guest, name="eth1"))
    with pytest.raises(InvalidArgumentError, match=re.escape("invalid IP address '10.0.0.300'")):
        bad = [types_pb2.IPAddress(address="10.0.0.300", mask="24")]
        guest.run(Network().update_interface, wanted(guest, IPAddresses=bad))
    configure(guest)
    unreachable = types_pb2.Route(dest="10.9.0.0/16", gateway="192.0.2.1", device="eth0")
    with pytest.raises(
        InvalidArgumentError, match=re.escape("cannot add route 10.9.0.0/16 via 192.0.2.1")
    ):
        guest.run(Network().update_routes, [unreachable])
    with pytest.raises(NotFoundError, match="guest interface 'nosuch0' not found"):
        guest.run(Network().update_routes, [types_pb2.Route(dest="10.9.0.0/16", device="nosuch0")])


def test_update_routes_replaces_the_routes_of_the_link(guest: Guest) -> None:
    configure(guest)
    guest.ip("route", "add", "10.66.0.0/16", "dev", "eth0")  # stale: not in the request
    other = f"10.215.{guest.subnet}"
    routes = [
        # the gateway is reachable only through the link-scope route listed after it
        types_pb2.Route(gateway=f"{other}.1", device="eth0"),
        types_pb2.Route(dest="10.77.0.0/16", gateway=guest.host_ip, device="eth0"),
        types_pb2.Route(dest=f"{other}.0/24", device="eth0", source=guest.guest_ip, scope=253),
        types_pb2.Route(
            dest="fd01::/64",
            gateway=f"fd00:{guest.subnet:x}::1",
            device="eth0",
            family=types_pb2.IPFamily.v6,
        ),
    ]
    for _ in range(2):  # a second time replaces, as the shim may resend
        got = guest.run(Network().update_routes, routes)
    shown = guest.ip("route", "show", "dev", "eth0")
    assert f"default via {other}.1 " in shown
    assert f"10.77.0.0/16 via {guest.host_ip} " in shown
    assert f"{other}.0/24 scope link src {guest.guest_ip} " in shown
    assert f"10.214.{guest.subnet}.0/24 proto kernel" in shown  # the kernel's own stays
    assert "10.66.0.0/16" not in shown
    assert f"fd01::/64 via fd00:{guest.subnet:x}::1 " in guest.ip(
        "-6", "route", "show", "dev", "eth0"
    )
    assert {(r.dest, r.gateway) for r in routes} <= {(r.dest, r.gateway) for r in got.Routes}


RouteRow = tuple[str, str, str, str, int, int]


def _ip_routes(guest: Guest) -> list[RouteRow]:
    scopes = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254}
    found: list[RouteRow] = []
    for family, kind in (("-4", types_pb2.IPFamily.v4), ("-6", types_pb2.IPFamily.v6)):
        for r in guest.ip_json(family, "route", "show"):
            dest = "" if r["dst"] == "default" else r["dst"]
            scope = scopes[r.get("scope", "global")]
            found.append(
                (dest, r.get("gateway", ""), r.get("dev", ""), r.get("prefsrc", ""), scope, kind)
            )
    return found


def test_listing_shows_what_ip_shows(guest: Guest) -> None:
    configure(guest)
    guest.ip("route", "add", "10.7.0.5", "dev", "eth0")  # a host route: no /32 in either
    guest.ip("route", "add", "default", "via", guest.host_ip)
    interfaces = guest.run(Network().list_interfaces).Interfaces
    links = guest.ip_json("link", "show")
    assert [(i.name, i.mtu, i.hwAddr) for i in interfaces] == [
        (link["ifname"], link["mtu"], link.get("address", "")) for link in links
    ]
    shown = {
        a["ifname"]: [(x["local"], str(x["prefixlen"])) for x in a["addr_info"]]
        for a in guest.ip_json("addr", "show")
    }
    assert {i.name: [(a.address, a.mask) for a in i.IPAddresses] for i in interfaces} == shown
    routes = guest.run(Network().list_routes).Routes
    got = [(r.dest, r.gateway, r.device, r.source, r.scope, r.family) for r in routes]
    assert got == _ip_routes(guest)
    assert ("10.7.0.5", "", "eth0", "", 253, types_pb2.IPFamily.v4) in got


def test_static_neighbours(guest: Guest) -> None:
    configure(guest)
    neighbour = types_pb2.ARPNeighbor(
        toIPAddress=types_pb2.IPAddress(address=f"10.214.{guest.subnet}.9"),
        device="eth0",
        lladdr="02:00:00:00:00:09",
    )
    guest.run(Network().add_arp_neighbors, [neighbour])
    guest.run(Network().add_arp_neighbors, [neighbour])  # replace, not add
    shown = guest.ip("neigh", "show", "dev", "eth0")
    assert f"10.214.{guest.subnet}.9 lladdr 02:00:00:00:00:09 PERMANENT" in shown
    neighbour.device = "nosuch0"
    with pytest.raises(NotFoundError, match="guest interface 'nosuch0' not found"):
        guest.run(Network().add_arp_neighbors, [neighbour])
