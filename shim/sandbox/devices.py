"""Device bookkeeping for one sandbox, independent of the VMM.

``DeviceManager`` names the disks a sandbox hot-adds (ids and serials),
checks the plugin's capabilities before asking it for any device (disks, the
pod's NICs), and remembers what is attached so it can be removed again.
``SlotAllocator`` hands out a fixed set
of hot-plug slots (a QEMU plugin's PCIe root ports) to devices by id.

Everything derived is deterministic from the sandbox id and an index, so a
restarted shim computes the same names.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from shim.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    NotSupportedError,
)
from shim.hypervisor import BlockDevice, Device, Hypervisor, NetDevice
from shim.metrics.recorder import HOTPLUG

#: vsock CIDs 0-2 are reserved (hypervisor, local, host); 2**32-1 is VMADDR_CID_ANY
CID_MIN = 3
CID_MAX = 0xFFFFFFFE
#: virtio-blk serials longer than this are cut by QEMU
SERIAL_MAX = 20


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()


def guest_cid(sandbox_id: str, attempt: int = 0) -> int:
    """A vsock guest CID for the sandbox; try ``attempt`` 1, 2, ... when one is taken."""
    span = CID_MAX - CID_MIN + 1
    base = int.from_bytes(_digest("cid", sandbox_id)[:4], "big")
    return CID_MIN + (base + attempt) % span


def disk_serial(sandbox_id: str, device_id: str) -> str:
    """A virtio-blk serial (the guest's /dev/disk/by-id/virtio-<serial>)."""
    return ("husk" + _digest("serial", sandbox_id, device_id).hex())[:SERIAL_MAX]


class SlotAllocator:
    """A fixed set of named hot-plug slots, each held by at most one device id."""

    def __init__(self, slots: Iterable[str]) -> None:
        self._slots = list(slots)
        self._owner: dict[str, str] = {}

    def take(self, owner: str) -> str:
        """The first free slot, now held by ``owner`` (its own if it holds one)."""
        held = self.slot_of(owner)
        if held is not None:
            return held
        for slot in self._slots:
            if slot not in self._owner:
                self._owner[slot] = owner
                return slot
        raise FailedPreconditionError(
            f"no free hot-plug slot for device {owner}: all {len(self._slots)} are in use "
            "(raise pcie_root_ports in [hypervisor.qemu])"
        )

    def release(self, owner: str) -> str | None:
        """Free the slot ``owner`` holds; returns it (None if it held none)."""
        slot = self.slot_of(owner)
        if slot is not None:
            del self._owner[slot]
        return slot

    def slot_of(self, owner: str) -> str | None:
        """The slot ``owner`` holds, if any."""
        for slot, who in self._owner.items():
            if who == owner:
                return slot
        return None


class DeviceManager:
    """The devices hot-added to one sandbox's VM, named deterministically."""

    def __init__(self, sandbox_id: str, hypervisor: Hypervisor) -> None:
        self.sandbox_id = sandbox_id
        self.hypervisor = hypervisor
        self._next: dict[str, int] = {}
        self._attached: dict[str, Device] = {}

    def _index(self, kind: str) -> int:
        index = self._next.get(kind, 0)
        self._next[kind] = index + 1
        return index

    def block(self, path: Path, *, format: str = "raw", readonly: bool = False) -> BlockDevice:
        """A new disk description: id ``blk<n>`` and a serial the guest can find."""
        device_id = f"blk{self._index('blk')}"
        return BlockDevice(
            id=device_id,
            path=path,
            format=format,
            readonly=readonly,
            serial=disk_serial(self.sandbox_id, device_id),
        )

    async def attach(self, device: Device) -> Device:
        """Hot-add ``device``, after checking the plugin can."""
        if device.id in self._attached:
            raise AlreadyExistsError(
                f"device {device.id} is already attached to sandbox {self.sandbox_id}"
            )
        self._check_capable(device)
        started = time.monotonic()
        await self.hypervisor.add_device(device)
        HOTPLUG.observe((_kind(device), "add"), time.monotonic() - started)
        self._attached[device.id] = device
        return device

    async def detach(self, device_id: str) -> None:
        """Hot-remove an attached device; returns once the guest released it."""
        device = self._attached.get(device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} is not attached to sandbox {self.sandbox_id}")
        started = time.monotonic()
        await self.hypervisor.remove_device(device)
        HOTPLUG.observe((_kind(device), "remove"), time.monotonic() - started)
        del self._attached[device_id]

    @property
    def attached(self) -> Mapping[str, Device]:
        """Device id → device, for what is attached now."""
        return dict(self._attached)

    def _check_capable(self, device: Device) -> None:
        caps = self.hypervisor.capabilities()
        needed = {BlockDevice: caps.block_hotplug, NetDevice: caps.net_hotplug}
        if not needed.get(type(device), False):
            raise NotSupportedError(self.hypervisor.name, f"hot-add of {type(device).__name__}")


def _kind(device: Device) -> str:
    """``block``, ``net``, ``vsock``, ``sharedfs``: the metrics label of a device."""
    return type(device).__name__.removesuffix("Device").lower()
