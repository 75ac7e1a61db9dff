"""The pod network into a real VM: the sandbox's network calls, made by hand.

What the sandbox does for networking, step by step, against the real QEMU
driver (TCG) and the real guest agent, without containerd: ``setup`` in a
CNI-style namespace, ``open_tap_fds``, hot-add ``device_with_fds`` to QEMU
(which runs in the host namespace), then ``UpdateInterface`` /
``UpdateRoutes`` / ``AddARPNeighbors`` to the agent. The host end of the veth
then pings the pod address and the guest kernel answers with the veth's MAC;
after ``destroy`` and ``teardown`` the veth is as it was.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from agent_proto import agent_pb2, types_pb2
from shim.agent.client import AGENT_SERVICE
from shim.agent.transport import connect
from shim.network import NetworkPlan, open_tap_fds, setup, teardown
from tests.integration.test_network import Pod, links, pod, veth_state
from tests.integration.test_qemu_vm import (
    AGENT_MARKER,
    driver,
    image,
    qemu_pids,
    spec_for,
    tap_until,
    workdir,
)
from ttrpc import Client, RpcError

__all__ = ["image", "pod", "workdir"]  # fixtures used by name

TIMEOUT = 60.0

Call = Callable[[str, Message, type[Message]], Awaitable[Any]]


@asynccontextmanager
async def guest_on_pod_network(
    pod: Pod, workdir: Path, image: tuple[Path, Path]
) -> AsyncIterator[tuple[NetworkPlan, Call]]:
    """A VM with the pod's NIC hot-added and configured, as the sandbox would do it."""
    before = veth_state(pod)
    plan = await trio.to_thread.run_sync(setup, pod.path, lambda entry: None)
    (ep,) = plan.endpoints
    hv = driver()
    try:
        await hv.prepare(spec_for(workdir, image))
        await hv.start(30)
        await tap_until(hv, AGENT_MARKER, timeout=TIMEOUT)
        fds = await trio.to_thread.run_sync(open_tap_fds, pod.path, ep.tap_name, ep.queues)
        try:
            await hv.add_device(ep.device_with_fds(fds))
        finally:
            for fd in fds:
                os.close(fd)  # QEMU holds its own copies now
        stream = await connect(hv.agent_endpoint(), TIMEOUT)
        async with Client.open(stream) as client:

            async def call(method: str, request: Message, response: type[Message]) -> Any:
                return await client.call(AGENT_SERVICE, method, request, response, timeout=TIMEOUT)

            iface = await _update_interface(call, ep.guest_interface())
            assert iface.hwAddr.lower() == pod.pod_mac and iface.mtu == 1400
            assert pod.pod_ip in [a.address for a in iface.IPAddresses]
            routes = agent_pb2.Routes(Routes=plan.guest_routes())
            got = await call(
                "UpdateRoutes", agent_pb2.UpdateRoutesRequest(routes=routes), agent_pb2.Routes
            )
            assert any(r.gateway == pod.host_ip for r in got.Routes), got
            yield plan, call
    finally:
        with trio.CancelScope(shield=True):
            await hv.destroy()
            await trio.to_thread.run_sync(teardown, plan)
    assert not qemu_pids(workdir)
    assert "tap0_husk" not in links(pod)
    assert veth_state(pod) == before


async def _update_interface(call: Call, wanted: types_pb2.Interface) -> Any:
    """``UpdateInterface``, retried while the hot-added NIC is not in the guest yet."""
    request = agent_pb2.UpdateInterfaceRequest(interface=wanted)
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                return await call("UpdateInterface", request, types_pb2.Interface)
            except RpcError as e:
                if "MAC address" not in str(e):
                    raise
                await trio.sleep(0.5)


def icmp_echo(address: str, timeout: float = 10.0, count: int = 3) -> int:
    """Echo requests to ``address`` (no ``ping`` binary needed); replies received."""
    ident, replies = os.getpid() & 0xFFFF, 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(timeout)
        for seq in range(count):
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            payload = b"husk-network-test"
            checksum = _checksum(header + payload)
            sock.sendto(struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload, (address, 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    packet, (source, _) = sock.recvfrom(2048)
                except TimeoutError:
                    break
                icmp = packet[(packet[0] & 0x0F) * 4 :]
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if source == address and kind == 0 and (rid, rseq) == (ident, seq):
                    replies += 1
                    break
    return replies


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


async def test_pod_network_reaches_the_guest(
    pod: Pod, workdir: Path, image: tuple[Path, Path]
) -> None:
    async with guest_on_pod_network(pod, workdir, image):
        # host end → veth → tc → tap → virtio-net → the guest's stack, and back
        replies = await trio.to_thread.run_sync(icmp_echo, pod.pod_ip)
        assert replies == 3
        neigh = subprocess.run(
            ["ip", "neigh", "show", pod.pod_ip, "dev", pod.host], capture_output=True, text=True
        ).stdout
        assert pod.pod_mac in neigh, neigh  # the guest answered ARP with the veth's MAC


async def test_static_neighbours_reach_the_guest(
    pod: Pod, workdir: Path, image: tuple[Path, Path]
) -> None:
    async with guest_on_pod_network(pod, workdir, image) as (plan, call):
        neighbors = agent_pb2.ARPNeighbors(ARPNeighbors=plan.guest_neighbors())
        assert len(neighbors.ARPNeighbors) == 1
        request = agent_pb2.AddARPNeighborsRequest(neighbors=neighbors)
        await call("AddARPNeighbors", request, empty_pb2.Empty)
        await call("AddARPNeighbors", request, empty_pb2.Empty)  # replace, not add
        # a neighbour on a device the guest lacks is NotFound, naming the device
        (wrong,) = neighbors.ARPNeighbors
        wrong.device = "nosuch0"
        bad = agent_pb2.AddARPNeighborsRequest(neighbors=neighbors)
        with pytest.raises(RpcError, match="nosuch0"):
            await call("AddARPNeighbors", bad, empty_pb2.Empty)
