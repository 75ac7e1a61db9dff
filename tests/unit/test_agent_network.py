"""Parsing ``ip -o`` output (busybox's and iproute2's) into Kata's network types."""

from __future__ import annotations

import socket
import struct

import pytest

from agent_proto import types_pb2
from guest.agent import netlink
from guest.agent.network import parse_addresses, parse_links, parse_routes, removable_routes

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


def test_kernel_routes_are_kept_when_routes_are_replaced() -> None:
    shown = (
        "default via 10.88.0.1 \n"
        "10.88.0.0/24 proto kernel scope link src 10.88.0.2 \n"
        "10.99.0.0/16 via 10.88.0.1 \n"
        "unreachable 10.66.0.0/16 \n"
        "fe80::/64 proto kernel metric 256 \n"
    )
    assert removable_routes(shown) == [
        ["default", "via", "10.88.0.1"],
        ["10.99.0.0/16", "via", "10.88.0.1"],
        ["unreachable", "10.66.0.0/16"],
    ]


# --- RTM_NEWNEIGH, byte for byte (what `ip neigh replace ... nud permanent` sends) ------


def test_new_neighbor_ipv4_message() -> None:
    message = netlink.new_neighbor(3, "10.88.0.9", "02:00:00:00:00:09", seq=7)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", message)
    assert (length, kind, seq, pid) == (len(message), 28, 7, 0)
    assert flags == 0x1 | 0x4 | 0x400 | 0x100  # REQUEST|ACK|CREATE|REPLACE
    family, _, _, ifindex, state, nflags, ntype = struct.unpack_from("=BBHiHBB", message, 16)
    assert (family, ifindex, state, nflags, ntype) == (socket.AF_INET, 3, 0x80, 0, 0)
    # NDA_DST: 4-byte header + 4 address bytes; NDA_LLADDR: 4 + 6, padded to 12
    assert message[28:36] == struct.pack("=HH", 8, 1) + bytes([10, 88, 0, 9])
    assert message[36:48] == struct.pack("=HH", 10, 2) + bytes.fromhex("020000000009") + b"\0\0"
    assert len(message) == 48


def test_new_neighbor_ipv6_without_lladdr() -> None:
    message = netlink.new_neighbor(5, "fd00::9", state=0x02, flags=0x08)
    family, _, _, ifindex, state, nflags, _ = struct.unpack_from("=BBHiHBB", message, 16)
    assert (family, ifindex, state, nflags) == (socket.AF_INET6, 5, 0x02, 0x08)
    assert message[28:48] == struct.pack("=HH", 20, 1) + socket.inet_pton(
        socket.AF_INET6, "fd00::9"
    )
    assert len(message) == 48


def test_bad_neighbor_values_are_refused() -> None:
    with pytest.raises(ValueError):
        netlink.new_neighbor(1, "10.0.0.300")
    with pytest.raises(ValueError, match="MAC"):
        netlink.mac_bytes("02:00:00:00:09")


def test_ack_error_reads_the_kernels_answer() -> None:
    def error_message(seq: int, error: int) -> bytes:
        original = struct.pack("=IHHII", 48, 28, 0x505, seq, 0)
        body = struct.pack("=i", error) + original
        return struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 4242) + body

    assert netlink.ack_error(error_message(1, 0), 1) == 0
    assert netlink.ack_error(error_message(1, -19), 1) == 19  # ENODEV
    assert netlink.ack_error(error_message(2, 0), 1) == -1  # someone else's answer
    assert netlink.ack_error(error_message(2, 0) + error_message(1, -22), 1) == 22
    assert netlink.ack_error(b"", 1) == -1
