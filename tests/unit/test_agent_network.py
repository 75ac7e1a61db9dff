"""The guest's rtnetlink, without a kernel: requests byte for byte, canned replies decoded.

The canned replies marked "from the kernel" were captured from a real
namespace (a veth ``d0`` with 10.1.0.2/24, a default route via 10.1.0.1 and a
host route 10.7.0.5); the requests are compared with what iproute2 sends.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable

import pytest

from agent_proto import types_pb2
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    HuskError,
    InvalidArgumentError,
    NotFoundError,
)
from guest.agent import netlink, rtnetlink
from guest.agent.netlink import Message, NetlinkError, Request
from guest.agent.network import describe_route, refused, route_pb, route_request

HDR = struct.Struct("=IHHII")


def ip(text: str) -> rtnetlink.IP:
    return ipaddress.ip_address(text)


def attr(kind: int, payload: bytes) -> bytes:
    """An rtattr, packed independently of the code under test."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def header(message: bytes) -> tuple[int, int, int, int, int]:
    return HDR.unpack_from(message)  # type: ignore[return-value]


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


# --- framing -----------------------------------------------------------------------


def test_attributes_are_padded_and_read_back() -> None:
    assert netlink.attribute(3, b"eth0\0") == struct.pack("=HH", 9, 3) + b"eth0\0\0\0\0"
    data = attr(3, b"eth0\0") + attr(4, u32(1400)) + attr(0x8000 | 18, attr(1, b"veth"))
    found = netlink.attributes(data)
    assert found[3] == b"eth0\0" and found[4] == u32(1400)
    assert found[18] == attr(1, b"veth")  # NLA_F_NESTED is not part of the number
    assert netlink.attributes(data + struct.pack("=HH", 40, 5) + b"short") == found


def test_request_packs_its_header() -> None:
    message = Request(18, 0x301, b"\1\2\3\4").pack(seq=9)
    assert header(message) == (20, 18, 0x301, 9, 0)
    assert message[16:] == b"\1\2\3\4"


def test_messages_splits_a_datagram() -> None:
    one = HDR.pack(16 + 5, 24, 2, 7, 0) + b"abcde" + b"\0\0\0"  # padded to 4
    two = HDR.pack(20, 3, 2, 7, 0) + u32(0)
    got = list(netlink.messages(one + two + b"\x30\0\0\0"))  # a truncated tail is dropped
    assert got == [Message(24, 2, 7, b"abcde"), Message(3, 2, 7, u32(0))]


# from the kernel: RTM_NEWROUTE 10.9.0.5/24 refused with an extended ack
EINVAL_WITH_EXT_ACK = bytes.fromhex(
    "50000000020000034e000000b8500000eaffffff34000000180005054e00000000000000"
    "2b000100496e76616c69642070726566697820666f7220676976656e20707265666978"
    "206c656e6774680000"
)


def test_errors_carry_the_kernels_explanation() -> None:
    (message,) = netlink.messages(EINVAL_WITH_EXT_ACK)
    assert netlink.error_of(message) == (
        errno.EINVAL,
        "Invalid prefix for given prefix length",
    )
    with pytest.raises(NetlinkError, match=r"Invalid argument \(Invalid prefix") as caught:
        netlink.raise_for(*netlink.error_of(message))
    assert caught.value.errno == errno.EINVAL


def test_plain_acks_and_uncapped_errors() -> None:
    request = Request(28, 0x505, b"x" * 28).pack(seq=1)
    ack = Message(2, 0, 1, u32(0) + request)
    assert netlink.error_of(ack) == (0, "")
    # not capped: the whole request is echoed before the TLVs
    tlvs = attr(1, b"no such thing\0")
    refused_ = Message(2, 0x200, 1, struct.pack("=i", -19) + request + tlvs)
    assert netlink.error_of(refused_) == (errno.ENODEV, "no such thing")
    assert netlink.error_of(Message(3, 2, 1, b"")) == (0, "")  # a dump's end
    assert netlink.error_of(Message(2, 0, 1, b"\0"))[0] == errno.EPROTO  # truncated


class FakeKernel:
    """Answers each request with the datagrams scripted for it (seq filled in)."""

    def __init__(self, script: Iterable[list[list[tuple[int, int, bytes]]]]) -> None:
        self.script = list(script)
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = header(data)[3]
        for datagram in self.script.pop(0):
            packed = b""
            for kind, flags, body in datagram:
                padding = b"\0" * (-len(body) % 4)
                packed += HDR.pack(16 + len(body), kind, flags, seq, 0) + body + padding
            self.queue.append(packed)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.queue.pop(0)

    def close(self) -> None:
        pass


def done(flags: int = 2) -> tuple[int, int, bytes]:
    return (3, flags, u32(0))


def test_socket_reads_a_dump_to_its_end() -> None:
    late = HDR.pack(20, 3, 2, 99, 0) + u32(0)  # an answer to some other request
    kernel = FakeKernel([[[(16, 2, b"one")], [(16, 2, b"two"), done()]]])
    kernel.queue.append(late)
    with netlink.Socket(sock=kernel) as nl:  # type: ignore[arg-type]
        replies = nl.call(rtnetlink.get_links())
    assert [m.body for m in replies] == [b"one", b"two"]
    assert header(kernel.sent[0])[2] == 0x301  # REQUEST | DUMP


def test_socket_retries_an_interrupted_dump_and_raises_refusals() -> None:
    interrupted = [[(16, 2 | 0x10, b"stale"), done(2 | 0x10)]]
    kernel = FakeKernel([interrupted, [[(16, 2, b"fresh"), done()]], [[(2, 0, u32(2**32 - 17))]]])
    nl = netlink.Socket(sock=kernel)  # type: ignore[arg-type]
    assert [m.body for m in nl.call(rtnetlink.get_links())] == [b"fresh"]
    with pytest.raises(NetlinkError) as caught:
        nl.call(rtnetlink.set_link(3, up=True))
    assert caught.value.errno == errno.EEXIST
    assert [header(m)[3] for m in kernel.sent] == [1, 2, 3]


def test_socket_returns_nothing_for_an_ack() -> None:
    kernel = FakeKernel([[[(2, 0x100, u32(0) + b"\0" * 16)]]])
    assert netlink.Socket(sock=kernel).call(rtnetlink.set_link(3, up=True)) == []  # type: ignore[arg-type]


# --- links -------------------------------------------------------------------------


def link_message(index: int, name: str, arphrd: int, flags: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BxHiII", 0, arphrd, index, flags, 0)
    body += attr(3, name.encode() + b"\0") + attr(4, u32(1450))
    body += attr(0x8000 | 18, attr(1, b"veth\0"))  # IFLA_LINKINFO, skipped
    return body + b"".join(attrs)


def test_get_links_is_ip_link_show() -> None:
    message = rtnetlink.get_links().pack(seq=1)
    assert header(message) == (32, 18, 0x301, 1, 0)
    assert message[16:] == b"\0" * 16


def test_parse_link() -> None:
    mac = bytes.fromhex("0242ac110002")
    body = link_message(7, "eth0", 1, 0x11043, attr(1, mac), attr(2, b"\xff" * 6))
    link = rtnetlink.parse_link(body)
    assert link == rtnetlink.Link(7, "eth0", 0x11043, 1450, 1, mac)
    assert (link.type_name, link.address_text) == ("ether", "02:42:ac:11:00:02")


@pytest.mark.parametrize(
    ("arphrd", "address", "type_name", "text"),
    [
        (772, b"\0" * 6, "loopback", "00:00:00:00:00:00"),
        (65534, b"", "none", ""),  # a tun device has no link-layer address
        (776, bytes([10, 0, 0, 1]), "sit", "10.0.0.1"),
        (9999, b"\1\2", "[9999]", "01:02"),
    ],
)
def test_link_types_and_addresses_read_like_ip_link(
    arphrd: int, address: bytes, type_name: str, text: str
) -> None:
    link = rtnetlink.Link(1, "x", 0, 1500, arphrd, address)
    assert (link.type_name, link.address_text) == (type_name, text)


def test_set_link_down_rename_mtu_and_up() -> None:
    down = rtnetlink.set_link(4, up=False, name="eth1", mtu=1400).pack(seq=3)
    assert header(down)[1:3] == (16, 0x5)  # RTM_NEWLINK, REQUEST | ACK
    assert struct.unpack_from("=BxHiII", down, 16) == (0, 0, 4, 0, 0x1)  # flags 0, change UP
    assert down[32:] == attr(3, b"eth1\0") + attr(4, u32(1400))
    up = rtnetlink.set_link(4, up=True).pack(seq=4)
    assert struct.unpack_from("=BxHiII", up, 16) == (0, 0, 4, 0x1, 0x1) and len(up) == 32
    mtu_only = rtnetlink.set_link(4, mtu=9000).pack(seq=5)
    assert struct.unpack_from("=BxHiII", mtu_only, 16)[3:] == (0, 0)  # flags untouched


@pytest.mark.parametrize(
    ("name", "valid"),
    [("eth0", True), ("a" * 15, True), ("a" * 16, False), ("", False), ("a/b", False),
     ("a b", False), ("..", False), ("eth0:1", False)],
)  # fmt: skip
def test_link_names_the_kernel_takes(name: str, valid: bool) -> None:
    assert rtnetlink.valid_link_name(name) is valid


# --- addresses ---------------------------------------------------------------------

# from the kernel: 10.1.0.2/24 on link 3, with IFA_LABEL, IFA_FLAGS and IFA_CACHEINFO
ADDRESS_DUMP = bytes.fromhex(
    "4c00000014000200" "4d000000b8500000"
    "0218800003000000080001000a010002080002000a0100020700030064300000"
    "080008008000000014000600ffffffffffffffff07e1010007e10100"
    "1400000003000200" "4d000000b8500000" "00000000"
)  # fmt: skip


def test_parse_addresses_from_the_kernel() -> None:
    first, end = netlink.messages(ADDRESS_DUMP)
    assert (first.kind, end.kind) == (20, 3)
    address = rtnetlink.parse_address(first.body)
    assert (address.family, address.index, address.prefixlen, address.scope) == (2, 3, 24, 0)
    assert address.ip == address.local == address.peer == ip("10.1.0.2")


def test_a_peer_address_and_an_ipv6_address_without_ifa_local() -> None:
    body = struct.pack("=BBBBi", 2, 32, 0, 0, 5)
    body += attr(1, ip("10.0.0.1").packed) + attr(2, ip("10.0.0.2").packed)
    point_to_point = rtnetlink.parse_address(body)
    assert (point_to_point.ip, point_to_point.peer) == (ip("10.0.0.2"), ip("10.0.0.1"))
    body = struct.pack("=BBBBi", 10, 64, 0, 253, 5) + attr(1, ip("fe80::1").packed)
    v6 = rtnetlink.parse_address(body)
    assert (v6.ip, v6.prefixlen, v6.scope) == (ip("fe80::1"), 64, 253)


def test_new_address_is_ip_addr_add() -> None:
    message = rtnetlink.new_address(3, ip("10.88.0.5"), 16).pack(seq=2)
    assert header(message)[1:3] == (20, 0x1 | 0x4 | 0x400 | 0x200)  # CREATE | EXCL
    assert struct.unpack_from("=BBBBi", message, 16) == (2, 16, 0, 0, 3)
    assert message[24:] == attr(2, bytes([10, 88, 0, 5])) + attr(1, bytes([10, 88, 0, 5]))
    loopback = rtnetlink.new_address(1, ip("127.0.0.2"), 8).pack(seq=2)
    assert struct.unpack_from("=BBBBi", loopback, 16)[3] == 254  # host scope, as ip makes it
    v6 = rtnetlink.new_address(3, ip("fd00::5"), 64).pack(seq=2)
    assert struct.unpack_from("=BBBBi", v6, 16) == (10, 64, 0, 0, 3) and len(v6) == 24 + 40
    with pytest.raises(ValueError, match="prefix length 33"):
        rtnetlink.new_address(3, ip("10.0.0.1"), 33)


def test_del_address_echoes_what_the_dump_said() -> None:
    first, _ = netlink.messages(ADDRESS_DUMP)
    message = rtnetlink.del_address(rtnetlink.parse_address(first.body)).pack(seq=4)
    assert header(message)[1:3] == (21, 0x5)
    assert struct.unpack_from("=BBBBi", message, 16) == (2, 24, 0, 0, 3)
    assert message[24:] == attr(2, bytes([10, 1, 0, 2])) + attr(1, bytes([10, 1, 0, 2]))


# --- routes ------------------------------------------------------------------------

# from the kernel (bodies): default via 10.1.0.1 dev d0; 10.1.0.0/24 proto kernel scope
# link src 10.1.0.2; 10.7.0.5 scope link (a host route); a local-table route
DEFAULT_ROUTE = bytes.fromhex(
    "02000000fe0300010000000008000f00fe000000080005000a0100010800040003000000"
)
SUBNET_ROUTE = bytes.fromhex(
    "02180000fe02fd010000000008000f00fe000000080001000a010000080007000a0100020800040003000000"
)
HOST_ROUTE = bytes.fromhex(
    "02200000fe03fd010000000008000f00fe000000080001000a0700050800040003000000"
)
LOCAL_ROUTE = bytes.fromhex(
    "02200000ff02fe020000000008000f00ff000000080001000a010002080007000a0100020800040003000000"
)


def test_parse_routes_from_the_kernel() -> None:
    default = rtnetlink.parse_route(DEFAULT_ROUTE)
    assert (default.dest_text, default.gateway, default.oif) == ("", ip("10.1.0.1"), 3)
    assert (default.table, default.protocol, default.scope, default.type) == (254, 3, 0, 1)
    subnet = rtnetlink.parse_route(SUBNET_ROUTE)
    assert (subnet.dest_text, subnet.prefsrc, subnet.scope) == ("10.1.0.0/24", ip("10.1.0.2"), 253)
    assert subnet.protocol == rtnetlink.RTPROT_KERNEL and subnet.gateway is None
    assert rtnetlink.parse_route(HOST_ROUTE).dest_text == "10.7.0.5"  # ip shows no /32
    assert rtnetlink.parse_route(LOCAL_ROUTE).table == 255


def test_routes_as_kata_routes() -> None:
    names = {3: "eth0"}
    assert route_pb(rtnetlink.parse_route(DEFAULT_ROUTE), names) == types_pb2.Route(
        gateway="10.1.0.1", device="eth0", family=types_pb2.IPFamily.v4
    )
    assert route_pb(rtnetlink.parse_route(SUBNET_ROUTE), names) == types_pb2.Route(
        dest="10.1.0.0/24", device="eth0", source="10.1.0.2", scope=253
    )
    v6 = rtnetlink.Route(socket.AF_INET6, 64, ip("fd00::"), oif=9, priority=256)
    assert route_pb(v6, names) == types_pb2.Route(dest="fd00::/64", family=types_pb2.IPFamily.v6)


def test_get_routes_dumps_one_family() -> None:
    message = rtnetlink.get_routes(socket.AF_INET6).pack(seq=1)
    assert header(message) == (28, 26, 0x301, 1, 0)
    assert message[16] == socket.AF_INET6 and message[17:] == b"\0" * 11


def test_replace_route_is_ip_route_replace() -> None:
    route = route_request(
        types_pb2.Route(
            dest="10.99.0.0/16", gateway="10.88.0.1", device="eth0", source="10.88.0.5"
        ),
        index=3,
    )
    message = rtnetlink.replace_route(route).pack(seq=5)
    assert header(message)[1:3] == (24, 0x1 | 0x4 | 0x400 | 0x100)  # CREATE | REPLACE
    # family, dst_len, src_len, tos, table main, proto boot, scope universe, unicast, flags
    assert struct.unpack_from("=BBBBBBBBI", message, 16) == (2, 16, 0, 0, 254, 3, 0, 1, 0)
    assert message[28:] == (
        attr(1, bytes([10, 99, 0, 0]))
        + attr(5, bytes([10, 88, 0, 1]))
        + attr(7, bytes([10, 88, 0, 5]))
        + attr(4, u32(3))
        + attr(15, u32(254))
    )


def test_del_route_names_the_route_the_dump_returned() -> None:
    message = rtnetlink.del_route(rtnetlink.parse_route(DEFAULT_ROUTE)).pack(seq=6)
    assert header(message)[1:3] == (25, 0x5)
    assert struct.unpack_from("=BBBBBBBBI", message, 16) == (2, 0, 0, 0, 254, 3, 0, 1, 0)
    assert message[28:] == attr(5, bytes([10, 1, 0, 1])) + attr(4, u32(3)) + attr(15, u32(254))
    big_table = rtnetlink.Route(socket.AF_INET, table=1000, priority=7)
    body = rtnetlink.del_route(big_table).body
    assert body[4] == 0 and body[12:] == attr(6, u32(7)) + attr(15, u32(1000))


def test_route_requests_take_ips_defaults() -> None:
    link_scope = route_request(types_pb2.Route(dest="10.88.0.0/24", device="eth0"), 3)
    assert (link_scope.scope, link_scope.dst_len, link_scope.oif) == (253, 24, 3)
    default = route_request(types_pb2.Route(gateway="10.88.0.1", device="eth0"), 3)
    assert (default.scope, default.dst, default.dst_len) == (0, None, 0)
    assert route_request(types_pb2.Route(dest="default", gateway="10.0.0.1"), 0).dst is None
    assert route_request(types_pb2.Route(dest="10.1.2.3", scope=254), 0).dst_len == 32
    # the family follows the addresses, as `ip route` infers it; else the field says
    v6 = route_request(types_pb2.Route(dest="fd00::/64", device="eth0"), 3)
    assert (v6.family, v6.dst_len) == (socket.AF_INET6, 64)
    v6_default = route_request(types_pb2.Route(family=types_pb2.IPFamily.v6, device="eth0"), 3)
    assert v6_default.family == socket.AF_INET6


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (types_pb2.Route(dest="10.0.0.0/33"), "invalid route destination '10.0.0.0/33'"),
        (types_pb2.Route(gateway="nonsense"), "invalid IP address 'nonsense'"),
        (types_pb2.Route(dest="fd00::/64", gateway="10.0.0.1"), "mixes IPv4 and IPv6"),
    ],
)
def test_bad_routes_are_invalid_arguments(route: types_pb2.Route, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        route_request(route, 0)


def test_routes_are_described_as_ip_shows_them() -> None:
    route = types_pb2.Route(gateway="10.0.0.1", device="eth0", source="10.0.0.2", scope=200)
    assert describe_route(route) == "default via 10.0.0.1 dev eth0 src 10.0.0.2 scope 200"


# --- neighbours --------------------------------------------------------------------


def test_replace_neighbor_ipv4_message() -> None:
    message = rtnetlink.replace_neighbor(3, ip("10.88.0.9"), "02:00:00:00:00:09").pack(seq=7)
    length, kind, flags, seq, pid = header(message)
    assert (length, kind, seq, pid) == (len(message), 28, 7, 0)
    assert flags == 0x1 | 0x4 | 0x400 | 0x100  # REQUEST|ACK|CREATE|REPLACE
    family, _, _, ifindex, state, nflags, ntype = struct.unpack_from("=BBHiHBB", message, 16)
    assert (family, ifindex, state, nflags, ntype) == (socket.AF_INET, 3, 0x80, 0, 0)
    # NDA_DST: 4-byte header + 4 address bytes; NDA_LLADDR: 4 + 6, padded to 12
    assert message[28:36] == struct.pack("=HH", 8, 1) + bytes([10, 88, 0, 9])
    assert message[36:48] == struct.pack("=HH", 10, 2) + bytes.fromhex("020000000009") + b"\0\0"
    assert len(message) == 48


def test_replace_neighbor_ipv6_without_lladdr() -> None:
    message = rtnetlink.replace_neighbor(5, ip("fd00::9"), state=0x02, flags=0x08).pack(seq=1)
    family, _, _, ifindex, state, nflags, _ = struct.unpack_from("=BBHiHBB", message, 16)
    assert (family, ifindex, state, nflags) == (socket.AF_INET6, 5, 0x02, 0x08)
    assert message[28:48] == struct.pack("=HH", 20, 1) + ip("fd00::9").packed
    assert len(message) == 48


def test_bad_macs_are_refused() -> None:
    with pytest.raises(ValueError, match="MAC"):
        rtnetlink.mac_bytes("02:00:00:00:09")
    with pytest.raises(ValueError):
        rtnetlink.replace_neighbor(1, ip("10.0.0.1"), "02:00:00:00:00:zz")


# --- kernel refusals as husk errors ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENODEV, NotFoundError),
        (errno.EEXIST, AlreadyExistsError),
        (errno.EBUSY, FailedPreconditionError),
        (errno.EINVAL, InvalidArgumentError),
        (errno.ENETUNREACH, InvalidArgumentError),
        (errno.EPERM, HuskError),
    ],
)
def test_refusals_map_to_husk_errors(code: int, kind: type[HuskError]) -> None:
    error = refused("cannot add route default via 10.0.0.1", NetlinkError(code, "why"))
    assert type(error) is kind
    assert str(error) == "cannot add route default via 10.0.0.1: why"
