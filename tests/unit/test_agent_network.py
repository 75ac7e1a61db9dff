"""Parsing ``ip -o`` output (busybox's and iproute2's) into Kata's network types."""

from __future__ import annotations

from agent_proto import types_pb2
from guest.agent.network import parse_addresses, parse_links, parse_routes

LINKS = (
    "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT "
    "group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
    "2: eth0@if7: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc pfifo_fast state UP "
    "qlen 1000\\    link/ether 02:42:ac:11:00:02 brd ff:ff:ff:ff:ff:ff\n"
)
ADDRS = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "2: eth0    inet 10.88.0.5/16 brd 10.88.255.255 scope global eth0\\       valid_lft forever\n"
    "2: eth0    inet6 fe80::42:acff:fe11:2/64 scope link \\       valid_lft forever\n"
)


def test_links_and_addresses() -> None:
    links = parse_links(LINKS)
    assert list(links) == ["lo", "eth0"]
    eth0 = links["eth0"]
    assert (eth0.mtu, eth0.hwAddr, eth0.type) == (1450, "02:42:ac:11:00:02", "ether")
    assert eth0.raw_flags & 0x1  # IFF_UP
    parse_addresses(ADDRS, links)
    assert [(a.address, a.mask, a.family) for a in eth0.IPAddresses] == [
        ("10.88.0.5", "16", types_pb2.IPFamily.v4),
        ("fe80::42:acff:fe11:2", "64", types_pb2.IPFamily.v6),
    ]
    assert links["lo"].IPAddresses[0].address == "127.0.0.1"


def test_routes_busybox_style() -> None:
    text = "default via 10.88.0.1 dev eth0 \n10.88.0.0/16 dev eth0 scope link  src 10.88.0.5 \n"
    routes = parse_routes(text, types_pb2.IPFamily.v4)
    assert routes[0].dest == "" and routes[0].gateway == "10.88.0.1"
    assert routes[0].device == "eth0"
    assert (routes[1].dest, routes[1].source, routes[1].scope) == ("10.88.0.0/16", "10.88.0.5", 253)
