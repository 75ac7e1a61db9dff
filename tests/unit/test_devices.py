"""DeviceManager, SlotAllocator and the deterministic names (MACs, CIDs, serials)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    NotSupportedError,
)
from shim.hypervisor import (
    AgentEndpoint,
    BlockDevice,
    Capabilities,
    Device,
    Hypervisor,
    NetDevice,
    SerialEndpoint,
    VmSpec,
    VmState,
    VsockDevice,
)
from shim.sandbox.devices import (
    CID_MAX,
    CID_MIN,
    SERIAL_MAX,
    DeviceManager,
    SlotAllocator,
    disk_serial,
    guest_cid,
)


class RecordingHypervisor(Hypervisor):
    """Records hot-plug calls; hot-plugs what its capabilities say."""

    name = "fake"

    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.calls: list[tuple[str, str]] = []

    def capabilities(self) -> Capabilities:
        return self.caps

    async def prepare(self, spec: VmSpec) -> None: ...
    async def start(self, timeout: float) -> None: ...
    async def stop(self) -> None: ...
    async def destroy(self) -> None: ...

    async def state(self) -> VmState:
        return VmState.RUNNING

    def agent_endpoint(self) -> AgentEndpoint:
        return SerialEndpoint(Path("/nonexistent"))

    async def add_device(self, device: Device) -> None:
        self.calls.append(("add", device.id))

    async def remove_device(self, device: Device) -> None:
        self.calls.append(("remove", device.id))


def test_guest_cid_in_range_and_retries_move_on() -> None:
    cids = [guest_cid("s", attempt) for attempt in range(5)]
    assert all(CID_MIN <= c <= CID_MAX for c in cids)
    assert len(set(cids)) == 5
    assert guest_cid("s") == guest_cid("s", 0)
    assert guest_cid("s") != guest_cid("t")


def test_disk_serial_fits_virtio_blk() -> None:
    serial = disk_serial("a" * 64, "blk0")
    assert len(serial) <= SERIAL_MAX
    assert serial.isalnum()
    assert serial != disk_serial("a" * 64, "blk1")


def test_slot_allocator_hands_out_and_releases() -> None:
    slots = SlotAllocator(["rp0", "rp1"])
    assert slots.take("blk0") == "rp0"
    assert slots.take("blk0") == "rp0"  # already held: the same slot
    assert slots.take("net0") == "rp1"
    with pytest.raises(FailedPreconditionError, match="no free hot-plug slot for device blk1"):
        slots.take("blk1")
    assert slots.release("blk0") == "rp0"
    assert slots.release("blk0") is None
    assert slots.take("blk1") == "rp0"
    assert slots.slot_of("blk1") == "rp0" and slots.slot_of("net0") == "rp1"


def test_zero_slots() -> None:
    with pytest.raises(FailedPreconditionError):
        SlotAllocator([]).take("blk0")


async def test_manager_names_attaches_and_detaches() -> None:
    hv = RecordingHypervisor(Capabilities(block_hotplug=True, net_hotplug=True))
    manager = DeviceManager("sb", hv)
    disk = manager.block(Path("/tmp/d.img"), readonly=True)
    assert (disk.id, disk.readonly, disk.serial) == ("blk0", True, disk_serial("sb", "blk0"))
    nic = NetDevice(id="net0", mac="02:00:00:00:00:01", tap_name="tap0")
    await manager.attach(disk)
    await manager.attach(nic)
    with pytest.raises(AlreadyExistsError):
        await manager.attach(disk)
    assert set(manager.attached) == {"blk0", "net0"}
    await manager.detach("blk0")
    with pytest.raises(NotFoundError):
        await manager.detach("blk0")
    assert hv.calls == [("add", "blk0"), ("add", "net0"), ("remove", "blk0")]
    assert manager.block(Path("/x")).id == "blk1"  # ids are never reused


async def test_manager_checks_capabilities_first() -> None:
    hv = RecordingHypervisor(Capabilities(block_hotplug=False, net_hotplug=True))
    manager = DeviceManager("sb", hv)
    with pytest.raises(NotSupportedError, match="hypervisor 'fake' does not support hot-add"):
        await manager.attach(manager.block(Path("/x")))
    with pytest.raises(NotSupportedError):
        await manager.attach(VsockDevice("vsock0", 3))
    assert hv.calls == []
    assert isinstance(manager.block(Path("/y")), BlockDevice)


async def test_hot_plug_durations_feed_the_metrics_histogram() -> None:
    from shim.metrics.recorder import HOTPLUG

    HOTPLUG.clear()
    manager = DeviceManager("sb", RecordingHypervisor(Capabilities(block_hotplug=True)))
    disk = manager.block(Path("/tmp/d.img"))
    await manager.attach(disk)
    await manager.detach(disk.id)
    counts = {labels: buckets[-1][1] for labels, buckets, _ in HOTPLUG.cumulative()}
    assert counts == {("block", "add"): 1.0, ("block", "remove"): 1.0}
