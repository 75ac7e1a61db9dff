"""What husk learns about a pod's interfaces, and what it tells the guest.

Pure data: no netlink here. ``scan`` fills these from the namespace, ``setup``
adds the tap that carries each one, and the sandbox sends the ``guest_*``
messages to the agent (``UpdateInterface``, ``UpdateRoutes``,
``AddARPNeighbors``) after hot-adding ``Endpoint.device``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent_proto import types_pb2
from shim.hypervisor import NetDevice

#: called with a description of each host object before it is created
Recorder = Callable[[dict[str, Any]], None]

#: Linux IFNAMSIZ minus the terminating NUL
IFNAME_MAX = 15
#: ``ndm_state`` of a static neighbour (``ip neigh add ... nud permanent``)
NUD_PERMANENT = 0x80
#: ``IFF_NOARP``: the only link flag the guest copies (as Kata does)
IFF_NOARP = 0x80


def tap_name(index: int) -> str:
    """The tap carrying the ``index``-th interface: ``tap0_husk``, ``tap1_husk``, …"""
    name = f"tap{index}_husk"
    if len(name) > IFNAME_MAX:
        raise ValueError(f"tap index {index} makes a name longer than {IFNAME_MAX}")
    return name


def device_id(index: int) -> str:
    """The hypervisor's id for the NIC of the ``index``-th interface."""
    return f"husknet{index}"


def normalize_mac(mac: str) -> str:
    """``aa:bb:cc:dd:ee:ff`` in lower case; rejects anything that is not 6 octets."""
    octets = mac.strip().lower().replace("-", ":").split(":")
    hexdigits = set("0123456789abcdef")
    if len(octets) != 6 or not all(len(o) == 2 and set(o) <= hexdigits for o in octets):
        raise ValueError(f"not a MAC address: {mac!r}")
    return ":".join(octets)


def _family(address: str) -> types_pb2.IPFamily:
    return types_pb2.v6 if ipaddress.ip_address(address).version == 6 else types_pb2.v4


@dataclass(frozen=True)
class Address:
    """One address of an interface, with its prefix length."""

    address: str
    prefixlen: int

    def to_pb(self) -> types_pb2.IPAddress:
        """Kata's ``IPAddress``: the mask is the prefix length as a string."""
        return types_pb2.IPAddress(
            family=_family(self.address), address=self.address, mask=str(self.prefixlen)
        )


@dataclass(frozen=True)
class Route:
    """A route through the interface; ``dest`` "" is the default route."""

    dest: str = ""
    gateway: str = ""
    source: str = ""
    scope: int = 0
    family: int = socket.AF_INET

    def to_pb(self, device: str) -> types_pb2.Route:
        """Kata's ``Route`` on the guest interface named ``device``."""
        return types_pb2.Route(
            dest=self.dest,
            gateway=self.gateway,
            device=device,
            source=self.source,
            scope=self.scope,
            family=types_pb2.v6 if self.family == socket.AF_INET6 else types_pb2.v4,
        )


@dataclass(frozen=True)
class Neighbor:
    """A static (permanent) neighbour entry on the interface."""

    address: str
    lladdr: str
    state: int = NUD_PERMANENT
    flags: int = 0

    def to_pb(self, device: str) -> types_pb2.ARPNeighbor:
        """Kata's ``ARPNeighbor`` on the guest interface named ``device``."""
        return types_pb2.ARPNeighbor(
            toIPAddress=types_pb2.IPAddress(family=_family(self.address), address=self.address),
            device=device,
            lladdr=self.lladdr,
            state=self.state,
            flags=self.flags,
        )


@dataclass(frozen=True)
class LinkInfo:
    """An interface the CNI plugin left in the pod's namespace, as found."""

    name: str
    index: int
    kind: str
    mac: str
    mtu: int
    flags: int = 0
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One pod interface carried into the VM: the veth, its tap and the guest NIC.

    ``device`` is the NIC to hot-add: it carries the veth's MAC, so the guest
    answers ARP for the pod's address with the address the peers already know,
    and the veth's MTU. Its ``tap_name`` names a tap inside the pod's netns,
    which a VMM in the host netns cannot open by name: pass it fds from
    ``open_tap_fds`` with ``device_with_fds``.
    """

    link: LinkInfo
    tap_name: str
    device: NetDevice
    queues: int = 1

    def device_with_fds(self, fds: Sequence[int]) -> NetDevice:
        """``device`` with the tap fds the VMM should use instead of the name."""
        return replace(self.device, tap_fds=tuple(fds))

    def guest_interface(self, pci_path: str = "") -> types_pb2.Interface:
        """The ``UpdateInterface`` payload: name, addresses, MTU and MAC of the veth."""
        return types_pb2.Interface(
            device=self.link.name,
            name=self.link.name,
            IPAddresses=[a.to_pb() for a in self.link.addresses],
            mtu=self.link.mtu,
            hwAddr=self.link.mac,
            pciPath=pci_path,
            raw_flags=self.link.flags & IFF_NOARP,
        )

    def guest_routes(self) -> list[types_pb2.Route]:
        """This interface's routes, as ``Route`` messages."""
        return [r.to_pb(self.link.name) for r in self.link.routes]

    def guest_neighbors(self) -> list[types_pb2.ARPNeighbor]:
        """This interface's static neighbours, as ``ARPNeighbor`` messages."""
        return [n.to_pb(self.link.name) for n in self.link.neighbors]


@dataclass(frozen=True)
class NetworkPlan:
    """Everything ``setup`` built for one sandbox, and how to undo it.

    ``entries`` are the records passed to the recorder, in creation order;
    ``teardown`` reclaims them in reverse. An empty plan (no netns, or nothing
    but loopback in it) means the guest keeps only its loopback.
    """

    netns: str | None = None
    endpoints: tuple[Endpoint, ...] = ()
    entries: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        """True when there is no interface to carry into the VM."""
        return not self.endpoints

    def guest_routes(self) -> list[types_pb2.Route]:
        """All routes for one ``UpdateRoutes`` call, which replaces the guest's table.

        Routes without a gateway (the link-scope ones a gateway route may
        depend on) come first, so the agent can add them in order.
        """
        routes = [r for e in self.endpoints for r in e.guest_routes()]
        return sorted(routes, key=lambda r: bool(r.gateway))

    def guest_neighbors(self) -> list[types_pb2.ARPNeighbor]:
        """All static neighbours for one ``AddARPNeighbors`` call."""
        return [n for e in self.endpoints for n in e.guest_neighbors()]
