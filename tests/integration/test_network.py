"""Sandbox networking against real namespaces, veths, taps and tc (root, no VM).

Each test makes a namespace and a veth pair the way a CNI plugin would: one
end in the namespace as ``eth0`` with an address, a default route via the
host end and a static neighbour. Traffic is checked without a VM: the test
holds the tap fd where QEMU would and plays the guest's part.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from shim.network import (
    NetworkConflictError,
    NetworkNotFoundError,
    netns_path,
    open_tap_fds,
    reclaim,
    setup,
    teardown,
)
from shim.network.netns import run_in_netns
from shim.network.tcfilter import INGRESS_HANDLE

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, veth, tap)"),
]

VNET_HDR = 10  # struct virtio_net_hdr: frames on an IFF_VNET_HDR fd carry it first
ETH_P_ARP = 0x0806


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Pod:
    """A namespace with a CNI-style veth: ``eth0`` inside, ``host`` outside."""

    name: str
    path: str
    host: str
    host_ip: str
    pod_ip: str
    pod_mac: str


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag = uuid.uuid4().hex[:6]
    name, host = f"husk-test-{tag}", f"hk{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    host_ip, pod_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    pod_mac = f"02:42:0a:d5:{subnet:02x}:02"
    try:
        ip("netns", "add", name)
        ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("addr", "add", f"{host_ip}/24", "dev", host)
        ip("link", "set", host, "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "set", "eth0", "address", pod_mac, "mtu", "1400")
        ip("-n", name, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "route", "add", "default", "via", host_ip)
        ip("-n", name, "neigh", "add", f"10.213.{subnet}.9", "lladdr", "02:00:00:00:00:09",
           "dev", "eth0", "nud", "permanent")  # fmt: skip
        yield Pod(name, f"/var/run/netns/{name}", host, host_ip, pod_ip, pod_mac)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host], capture_output=True, check=False)


def in_pod(pod: Pod, fn: Any) -> Any:
    def work() -> Any:
        with IPRoute() as ipr:
            return fn(ipr)

    return run_in_netns(pod.path, work)


def veth_state(pod: Pod) -> dict[str, Any]:
    """What teardown must leave as it found it: addresses, MAC, MTU, flags, qdiscs."""

    def read(ipr: Any) -> dict[str, Any]:
        link = ipr.get_links(ifname="eth0")[0]
        index = link["index"]
        return {
            "index": index,
            "mac": link.get("IFLA_ADDRESS"),
            "mtu": link.get("IFLA_MTU"),
            "flags": link["flags"],
            "addresses": sorted(
                (a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)
            ),
            "qdiscs": sorted((q.get("TCA_KIND"), q["handle"]) for q in ipr.get_qdiscs(index)),
            "filters": len(ipr.get_filters(index=index, parent=INGRESS_HANDLE)),
        }

    return in_pod(pod, read)  # type: ignore[no-any-return]


def links(pod: Pod) -> set[str]:
    return {link.get("IFLA_IFNAME") for link in in_pod(pod, lambda ipr: ipr.get_links())}


def redirect_target(ipr: Any, index: int) -> int | None:
    """The ifindex that the u32 match-all filter on ``index`` redirects to."""
    for f in ipr.get_filters(index=index, parent=INGRESS_HANDLE):
        acts = f.get(("TCA_OPTIONS", "TCA_U32_ACT"))
        if acts is None:
            continue
        act = acts.get("TCA_ACT_PRIO_1")
        if act.get("TCA_ACT_KIND") == "mirred":
            parms = act.get(("TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS"))
            assert parms["eaction"] == 1  # egress redirect
            assert f["info"] >> 16 == 1  # prio 1
            return int(parms["ifindex"])
    return None


# --- setup and teardown ----------------------------------------------------------------


def test_setup_builds_tap_and_redirects_and_teardown_restores(pod: Pod) -> None:
    before = veth_state(pod)
    records: list[dict[str, Any]] = []
    spec = {"linux": {"namespaces": [{"type": "network", "path": pod.path}]}}
    plan = setup(netns_path(spec), records.append)
    try:
        (ep,) = plan.endpoints
        assert ep.tap_name == "tap0_husk"
        assert ep.device.mac == pod.pod_mac and ep.device.mtu == 1400
        iface = ep.guest_interface()
        assert (iface.name, iface.hwAddr, iface.mtu) == ("eth0", pod.pod_mac, 1400)
        assert [(a.address, a.mask) for a in iface.IPAddresses] == [(pod.pod_ip, "24")]
        subnet = pod.host_ip.rpartition(".")[0] + ".0/24"
        assert [(r.dest, r.gateway, r.source) for r in plan.guest_routes()] == [
            (subnet, "", pod.pod_ip),  # the agent flushes the device's routes: resend it
            ("", pod.host_ip, ""),
        ]
        assert [n.lladdr for n in plan.guest_neighbors()] == ["02:00:00:00:00:09"]
        assert [r["kind"] for r in records] == ["tap", "ingress", "ingress"]
        assert list(plan.entries) == records

        def check(ipr: Any) -> None:
            (tap,) = ipr.get_links(ifname="tap0_husk")
            veth = ipr.get_links(ifname="eth0")[0]
            assert tap.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "tun"
            assert tap.get("IFLA_MTU") == 1400 and tap["flags"] & 1  # up
            for link in (tap, veth):
                kinds = {q.get("TCA_KIND") for q in ipr.get_qdiscs(link["index"])}
                assert "ingress" in kinds
            assert redirect_target(ipr, veth["index"]) == tap["index"]
            assert redirect_target(ipr, tap["index"]) == veth["index"]

        in_pod(pod, check)
    finally:
        teardown(plan)
    assert "tap0_husk" not in links(pod)
    after = veth_state(pod)
    assert after == before and after["filters"] == 0
    teardown(plan)  # twice is fine


def test_only_loopback_gives_empty_plan(pod: Pod) -> None:
    ip("-n", pod.name, "link", "del", "eth0")
    records: list[dict[str, Any]] = []
    plan = setup(pod.path, records.append)
    assert plan.empty and records == []
    assert links(pod) == {"lo"}


def test_missing_netns_fails_naming_it_and_creates_nothing() -> None:
    path = f"/var/run/netns/husk-missing-{uuid.uuid4().hex[:6]}"
    records: list[dict[str, Any]] = []
    with pytest.raises(NetworkNotFoundError) as info:
        setup(path, records.append)
    assert str(info.value) == f"network namespace {path} does not exist"
    assert records == [] and not os.path.exists(path)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_interface_vanishing_mid_setup_is_undone(pod: Pod, step: int) -> None:
    """The veth goes away just before the tap, its redirect, or the tap's redirect."""
    records: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        records.append(entry)
        if len(records) == step + 1:
            ip("-n", pod.name, "link", "del", "eth0")  # the CNI plugin pulls it away

    with pytest.raises(NetworkNotFoundError) as info:
        setup(pod.path, record)
    message = str(info.value)
    assert "\n" not in message and "eth0" in message and pod.path in message
    assert [r["kind"] for r in records] == ["tap", "ingress", "ingress"][: step + 1]
    assert links(pod) == {"lo"}  # the tap is gone again


def test_existing_ingress_qdisc_is_refused_and_kept(pod: Pod) -> None:
    in_pod(pod, lambda ipr: ipr.tc("add", "ingress", ipr.link_lookup(ifname="eth0")[0]))
    before = veth_state(pod)
    with pytest.raises(NetworkConflictError, match=r"eth0 .* already has an ingress qdisc"):
        setup(pod.path, lambda entry: None)
    assert veth_state(pod) == before  # theirs, untouched
    assert "tap0_husk" not in links(pod)


def test_reclaim_after_a_crash_is_idempotent(pod: Pod) -> None:
    before = veth_state(pod)
    records: list[dict[str, Any]] = []
    setup(pod.path, records.append)  # the shim "dies" holding this plan
    for entry in reversed(records):
        reclaim(entry)
        reclaim(entry)
    assert "tap0_husk" not in links(pod)
    assert veth_state(pod) == before


def test_reclaim_never_deletes_a_link_that_is_not_a_tap(pod: Pod) -> None:
    reclaim({"kind": "tap", "netns": pod.path, "name": "eth0"})
    assert "eth0" in links(pod)


# --- the tap fd, and traffic through the redirects -----------------------------------------


def operstate(pod: Pod, name: str) -> str:
    return str(in_pod(pod, lambda ipr: ipr.get_links(ifname=name)[0].get("IFLA_OPERSTATE")))


def wait_operstate(pod: Pod, name: str, want: str, timeout: float = 5.0) -> str:
    """The operstate once it is ``want`` (the kernel's linkwatch settles it lazily)."""
    deadline = time.monotonic() + timeout
    while (state := operstate(pod, name)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return state


def read_arp(fd: int, timeout: float) -> bytes:
    """The next ARP frame on the tap fd (other frames, e.g. IPv6 ND, are skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            frame = os.read(fd, 65536)[VNET_HDR:]
            if struct.unpack("!H", frame[12:14])[0] == ETH_P_ARP:
                return frame
    raise AssertionError("no ARP frame on the tap")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_reply(src_mac: str, src_ip: str, dst_mac: str, dst_ip: str) -> bytes:
    eth = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
    arp += mac_bytes(src_mac) + ipaddress.IPv4Address(src_ip).packed
    arp += mac_bytes(dst_mac) + ipaddress.IPv4Address(dst_ip).packed
    return eth + arp


def test_tap_fd_brings_carrier_up_and_closes_cleanly(pod: Pod) -> None:
    plan = setup(pod.path, lambda entry: None)
    try:
        assert operstate(pod, "tap0_husk") == "DOWN"
        fds = open_tap_fds(pod.path, "tap0_husk")
        assert len(fds) == 1
        try:
            assert wait_operstate(pod, "tap0_husk", "UP") == "UP"
        finally:
            os.close(fds[0])
        assert wait_operstate(pod, "tap0_husk", "DOWN") == "DOWN"
        assert "tap0_husk" in links(pod)  # persistent: the fd was not its owner
        with pytest.raises(NetworkNotFoundError, match="tap9_husk does not exist"):
            open_tap_fds(pod.path, "tap9_husk")
        assert "tap9_husk" not in links(pod)
    finally:
        teardown(plan)


def test_frames_cross_the_redirects_both_ways(pod: Pod) -> None:
    plan = setup(pod.path, lambda entry: None)
    (fd,) = open_tap_fds(pod.path, plan.endpoints[0].tap_name)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sniffer.bind((pod.host, 0))
        sniffer.settimeout(5)
        host_mac = Path(f"/sys/class/net/{pod.host}/address").read_text().strip()

        # host → pod: the host's ARP for the pod address leaves through the tap
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"hello", (pod.pod_ip, 9))
        request = read_arp(fd, timeout=5)
        assert request[0:6] == b"\xff" * 6 and request[6:12] == mac_bytes(host_mac)
        assert request[20:22] == b"\x00\x01"  # who-has
        assert request[38:42] == ipaddress.IPv4Address(pod.pod_ip).packed

        # "guest" → host: a reply written to the tap comes out of the veth
        reply = arp_reply(plan.endpoints[0].device.mac, pod.pod_ip, host_mac, pod.host_ip)
        os.write(fd, bytes(VNET_HDR) + reply)
        deadline = time.monotonic() + 5
        while True:
            frame, _ = sniffer.recvfrom(65536)
            if frame[:42] == reply:
                break
            assert time.monotonic() < deadline, "the reply never reached the host end"
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=pod.host)[0]
            learned = {
                n.get("NDA_DST"): n.get("NDA_LLADDR") for n in ipr.get_neighbours(ifindex=index)
            }
        assert learned.get(pod.pod_ip) == pod.pod_mac
    finally:
        sniffer.close()
        os.close(fd)
        teardown(plan)


async def test_the_sandbox_call_pattern_from_trio(pod: Pod) -> None:
    """setup / open_tap_fds / teardown offloaded to trio worker threads, as documented."""
    import trio

    records: list[dict[str, Any]] = []
    plan = await trio.to_thread.run_sync(setup, pod.path, records.append)
    try:
        (ep,) = plan.endpoints
        fds = await trio.to_thread.run_sync(open_tap_fds, pod.path, ep.tap_name, ep.queues)
        device = ep.device_with_fds(fds)
        assert device.tap_fds == tuple(fds) and device.mac == pod.pod_mac
        for fd in fds:
            os.close(fd)
    finally:
        await trio.to_thread.run_sync(teardown, plan)
    assert "tap0_husk" not in links(pod)
