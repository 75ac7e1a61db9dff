"""Sandbox networking, the parts that need no root: spec, names, selection, protobufs."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from agent_proto import types_pb2
from shim.errors import InvalidArgumentError, NotFoundError
from shim.network import (
    Address,
    Endpoint,
    LinkInfo,
    Neighbor,
    NetworkError,
    NetworkNotFoundError,
    NetworkPlan,
    Route,
    UnsupportedInterfaceError,
    device_id,
    is_network_entry,
    netns_path,
    open_tap_fds,
    reclaim,
    setup,
    tap_name,
    teardown,
)
from shim.network.model import normalize_mac
from shim.network.scan import scan_links
from shim.network.tapfd import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, tap_flags

# --- the OCI spec ------------------------------------------------------------------


def test_netns_path_from_network_namespace_entry() -> None:
    spec = {
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"},
            ]
        }
    }
    assert netns_path(spec) == "/var/run/netns/cni-1234"


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"linux": {}},
        {"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}},
        {"linux": {"namespaces": [{"type": "network"}]}},
        {"linux": {"namespaces": [{"type": "network", "path": ""}]}},
    ],
)
def test_no_network_namespace_path_means_none(spec: dict[str, Any]) -> None:
    assert netns_path(spec) is None


def test_malformed_namespaces_is_one_line_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match=r"linux\.namespaces"):
        netns_path({"linux": {"namespaces": "network"}})
    with pytest.raises(InvalidArgumentError, match="not a string"):
        netns_path({"linux": {"namespaces": [{"type": "network", "path": 3}]}})


def test_no_netns_gives_an_empty_plan_and_records_nothing() -> None:
    records: list[dict[str, Any]] = []
    plan = setup(None, records.append)
    assert plan.empty and plan.netns is None and records == []
    assert plan.guest_routes() == [] and plan.guest_neighbors() == []
    teardown(plan)  # nothing to do, no error


# --- names and MACs ------------------------------------------------------------------


def test_tap_and_device_names() -> None:
    assert tap_name(0) == "tap0_husk"
    assert tap_name(12) == "tap12_husk"
    assert device_id(1) == "husknet1"
    with pytest.raises(ValueError, match="longer than 15"):
        tap_name(10**7)


def test_normalize_mac() -> None:
    assert normalize_mac("AA:bb:0C:dd:EE:0f") == "aa:bb:0c:dd:ee:0f"
    assert normalize_mac("aa-bb-cc-dd-ee-ff") == "aa:bb:cc:dd:ee:ff"
    for bad in ("", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:gg", "aabb.ccdd.eeff"):
        with pytest.raises(ValueError, match="MAC"):
            normalize_mac(bad)


def test_tap_flags_match_what_qemu_expects() -> None:
    assert tap_flags(1) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    assert tap_flags(4) & IFF_MULTI_QUEUE


# --- plan → protobuf -------------------------------------------------------------------


def _endpoint(name: str = "eth0", position: int = 0) -> Endpoint:
    from shim.hypervisor import NetDevice

    link = LinkInfo(
        name=name,
        index=2,
        kind="veth",
        mac="02:42:0a:00:00:02",
        mtu=1450,
        flags=0x1043 | 0x80,  # UP|BROADCAST|RUNNING|MULTICAST|NOARP
        addresses=(Address("10.88.0.2", 16), Address("fd00::2", 64)),
        routes=(
            Route(dest="", gateway="10.88.0.1"),
            Route(dest="10.88.0.1/32", scope=253),
            Route(dest="", gateway="fd00::1", family=socket.AF_INET6),
        ),
        neighbors=(Neighbor("10.88.0.9", "02:00:00:00:00:09"),),
    )
    tap = tap_name(position)
    device = NetDevice(id=device_id(position), mac=link.mac, tap_name=tap, mtu=link.mtu)
    return Endpoint(link=link, tap_name=tap, device=device)


def test_device_carries_the_veth_mac_and_mtu() -> None:
    ep = _endpoint()
    assert ep.device.mac == "02:42:0a:00:00:02"
    assert ep.device.mtu == 1450
    assert ep.device.tap_name == "tap0_husk"
    with_fds = ep.device_with_fds([7, 8])
    assert with_fds.tap_fds == (7, 8) and with_fds.mac == ep.device.mac


def test_guest_interface() -> None:
    iface = _endpoint().guest_interface(pci_path="02/01")
    assert iface.name == iface.device == "eth0"
    assert iface.hwAddr == "02:42:0a:00:00:02"
    assert iface.mtu == 1450
    assert iface.pciPath == "02/01"
    assert iface.raw_flags == 0x80  # only NOARP is copied
    assert [(a.family, a.address, a.mask) for a in iface.IPAddresses] == [
        (types_pb2.v4, "10.88.0.2", "16"),
        (types_pb2.v6, "fd00::2", "64"),
    ]
    # what the agent receives parses back to the same message
    assert types_pb2.Interface.FromString(iface.SerializeToString()) == iface


def test_guest_routes_put_gateway_free_routes_first() -> None:
    plan = NetworkPlan(netns="/x", endpoints=(_endpoint(),))
    routes = plan.guest_routes()
    assert [(r.dest, r.gateway, r.scope, r.family, r.device) for r in routes] == [
        ("10.88.0.1/32", "", 253, types_pb2.v4, "eth0"),
        ("", "10.88.0.1", 0, types_pb2.v4, "eth0"),
        ("", "fd00::1", 0, types_pb2.v6, "eth0"),
    ]


def test_guest_neighbors() -> None:
    (n,) = NetworkPlan(netns="/x", endpoints=(_endpoint(),)).guest_neighbors()
    assert n.toIPAddress.address == "10.88.0.9" and n.toIPAddress.family == types_pb2.v4
    assert n.lladdr == "02:00:00:00:00:09" and n.device == "eth0" and n.state == 0x80


# --- Kata's selection rules, on canned netlink answers ----------------------------------


class Msg(dict[Any, Any]):
    """A dict that answers ``get`` like a pyroute2 message (plain and nested keys)."""


def _link(index: int, name: str, kind: str | None, flags: int = 0x1043) -> Msg:
    m = Msg(index=index, flags=flags)
    m["IFLA_IFNAME"] = name
    m["IFLA_ADDRESS"] = f"02:00:00:00:00:{index:02x}"
    m["IFLA_MTU"] = 1500
    m[("IFLA_LINKINFO", "IFLA_INFO_KIND")] = kind
    return m


def _addr(index: int, address: str, prefixlen: int, family: int = socket.AF_INET) -> Msg:
    m = Msg(index=index, prefixlen=prefixlen, family=family)
    m["IFA_LOCAL" if family == socket.AF_INET else "IFA_ADDRESS"] = address
    return m


def _route(oif: int, proto: int, dst: str | None = None, dst_len: int = 0, gw: str = "") -> Msg:
    m = Msg(proto=proto, scope=0, dst_len=dst_len)
    m["RTA_OIF"], m["RTA_DST"], m["RTA_GATEWAY"] = oif, dst, gw or None
    return m


class FakeIPRoute:
    """The four pyroute2 queries ``scan_links`` makes, answered from lists."""

    def __init__(self, links: list[Msg], addrs: list[Msg], routes: list[Msg], neigh: list[Msg]):
        self.links, self.addrs, self.routes, self.neigh = links, addrs, routes, neigh

    def get_links(self) -> list[Msg]:
        return self.links

    def get_addr(self, index: int) -> list[Msg]:
        return [a for a in self.addrs if a["index"] == index]

    def get_routes(self, family: int, table: int) -> list[Msg]:
        v6 = family == socket.AF_INET6
        return [r for r in self.routes if (":" in str(r["RTA_DST"] or r["RTA_GATEWAY"])) == v6]

    def get_neighbours(self, ifindex: int) -> list[Msg]:
        return [n for n in self.neigh if n["ifindex"] == ifindex]


def _neigh(ifindex: int, dst: str, state: int) -> Msg:
    m = Msg(ifindex=ifindex, state=state, flags=0)
    m["NDA_DST"], m["NDA_LLADDR"] = dst, "02:AA:00:00:00:01"
    return m


def test_scan_follows_katas_rules() -> None:
    ipr = FakeIPRoute(
        links=[
            _link(1, "lo", None, flags=0x49),  # loopback
            _link(2, "eth1", "veth"),
            _link(3, "eth0", "veth"),
            _link(4, "tunl0", "ipip", flags=0x80),  # down, unaddressed
            _link(5, "eth2", "veth"),  # only an IPv6 link-local address
            _link(6, "eth3", "veth", flags=0x1002),  # addressed but down
        ],
        addrs=[
            _addr(1, "127.0.0.1", 8),
            _addr(2, "10.1.0.2", 24),
            _addr(3, "10.0.0.2", 24),
            _addr(3, "fe80::1", 64, socket.AF_INET6),
            _addr(5, "fe80::5", 64, socket.AF_INET6),
            _addr(6, "10.6.0.2", 24),
        ],
        routes=[
            _route(3, proto=2, dst="10.0.0.0", dst_len=24),  # kernel: the agent flushes it
            _route(3, proto=2, dst="fe80::", dst_len=64),  # kernel, IPv6: the guest makes it
            _route(3, proto=3, gw="10.0.0.1"),  # default
            _route(2, proto=4, dst="10.9.0.0", dst_len=16, gw="10.1.0.1"),
        ],
        neigh=[_neigh(3, "10.0.0.7", 0x80), _neigh(3, "10.0.0.8", 0x02)],
    )
    links = scan_links(ipr)
    assert [link.name for link in links] == ["eth0", "eth1"]  # sorted by name
    eth0, eth1 = links
    assert eth0.addresses == (Address("10.0.0.2", 24),)  # fe80:: left to the guest
    assert eth0.routes == (Route(dest="10.0.0.0/24"), Route(dest="", gateway="10.0.0.1"))
    assert eth0.neighbors == (Neighbor("10.0.0.7", "02:aa:00:00:00:01"),)
    assert eth0.mac == "02:00:00:00:00:03" and eth0.mtu == 1500
    assert eth1.routes == (Route(dest="10.9.0.0/16", gateway="10.1.0.1"),)


def test_scan_refuses_an_addressed_link_it_cannot_carry() -> None:
    ipr = FakeIPRoute([_link(2, "wg0", "wireguard")], [_addr(2, "10.0.0.2", 24)], [], [])
    with pytest.raises(UnsupportedInterfaceError, match=r"wg0 .*wireguard"):
        scan_links(ipr)


def test_scan_of_loopback_only_is_empty() -> None:
    ipr = FakeIPRoute([_link(1, "lo", None, flags=0x49)], [_addr(1, "127.0.0.1", 8)], [], [])
    assert scan_links(ipr) == []


# --- missing namespaces, without root ----------------------------------------------------


def test_missing_netns_is_one_line_not_found_and_records_nothing(tmp_path: Any) -> None:
    path = str(tmp_path / "no-such-netns")
    records: list[dict[str, Any]] = []
    with pytest.raises(NetworkNotFoundError) as info:
        setup(path, records.append)
    assert str(info.value) == f"network namespace {path} does not exist"
    assert isinstance(info.value, NotFoundError)
    assert records == []
    with pytest.raises(NetworkNotFoundError, match=path):
        open_tap_fds(path, "tap0_husk")


def test_reclaim_in_a_vanished_netns_is_fine(tmp_path: Any) -> None:
    path = str(tmp_path / "gone")
    for entry in (
        {"kind": "tap", "netns": path, "name": "tap0_husk"},
        {"kind": "ingress", "netns": path, "name": "eth0", "ifindex": 2},
    ):
        assert is_network_entry(entry)
        reclaim(entry)
        reclaim(entry)
    assert not is_network_entry({"kind": "vmm", "pid": 1})
    with pytest.raises(ValueError, match="not a network record"):
        reclaim({"kind": "vmm", "pid": 1})


def test_a_file_that_is_not_a_netns_is_refused(tmp_path: Any) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    with pytest.raises(NetworkError, match=f"^{path} is not a network namespace$"):
        setup(str(path), lambda entry: None)


def test_network_records_round_trip_through_the_sandbox_state() -> None:
    from shim.sandbox import cleanup

    entry = {"kind": "ingress", "netns": "/run/netns/p", "name": "eth0", "ifindex": 2}
    resource = cleanup.network_resource(entry)
    assert (resource.kind, resource.path, resource.name) == ("net-ingress", "/run/netns/p", "eth0")
    assert resource.describe() == "ingress redirect on eth0 in netns /run/netns/p"
    assert cleanup.network_entry(resource) == {k: entry[k] for k in ("kind", "netns", "name")}
    assert is_network_entry(cleanup.network_entry(resource))
