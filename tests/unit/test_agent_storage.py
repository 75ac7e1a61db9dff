"""Mount options and finding hot-plugged disks in a fake sysfs."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent_proto import agent_pb2
from common.mounts import split_options
from guest.agent.storage import (
    SysfsLayout,
    find_block_by_pci_path,
    find_block_by_serial,
    looks_like_pci_path,
    mount_storage,
    wait_for_block_device,
)
from shim.errors import DeadlineExceededError, InvalidArgumentError


def test_mount_options_split_flags_from_data() -> None:
    flags, data = split_options(["ro", "nosuid", "rw", "trans=virtio", "version=9p2000.L"])
    assert flags == 1 | 2
    assert data == "trans=virtio,version=9p2000.L"


def fake_disk(tmp_path: Path, name: str, serial: str, pci: list[str]) -> SysfsLayout:
    device = tmp_path / "sys" / "devices" / "pci0000:00"
    for part in pci:
        device = device / part
    (device / "virtio3" / "block" / name).mkdir(parents=True)
    block = tmp_path / "sys" / "block" / name
    block.mkdir(parents=True)
    (block / "serial").write_text(serial + "\n")
    (tmp_path / "dev").mkdir(exist_ok=True)
    (tmp_path / "dev" / name).touch()
    return SysfsLayout(sys=tmp_path / "sys", dev=tmp_path / "dev")


def test_disk_found_by_serial_and_by_pci_path(tmp_path: Path) -> None:
    layout = fake_disk(tmp_path, "vdb", "ctr-c1", ["0000:00:02.0", "0000:01:03.0"])
    assert find_block_by_serial("ctr-c1", layout) == tmp_path / "dev" / "vdb"
    assert find_block_by_serial("other", layout) is None
    assert find_block_by_pci_path("02/03", layout) == tmp_path / "dev" / "vdb"
    assert find_block_by_pci_path("02/04", layout) is None
    assert looks_like_pci_path("02/03") and not looks_like_pci_path("ctr-c1")


async def test_waiting_for_a_disk_that_never_comes(tmp_path: Path) -> None:
    layout = SysfsLayout(sys=tmp_path, dev=tmp_path)
    with pytest.raises(DeadlineExceededError, match="'missing'"):
        await wait_for_block_device("missing", layout, timeout=0.1)


async def test_disk_that_appears_later_is_found(tmp_path: Path) -> None:
    async def plug() -> None:
        await trio.sleep(0.1)
        fake_disk(tmp_path, "vdc", "late", ["0000:00:05.0"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(plug)
        layout = SysfsLayout(sys=tmp_path / "sys", dev=tmp_path / "dev")
        assert await wait_for_block_device("late", layout, timeout=5) == tmp_path / "dev" / "vdc"


async def test_local_storage_and_refusals(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    storage = agent_pb2.Storage(driver="local", mount_point=str(target), options=["mode=0700"])
    assert await mount_storage(storage) == str(target)
    assert target.stat().st_mode & 0o777 == 0o700
    with pytest.raises(InvalidArgumentError, match="'nfs' is not supported"):
        await mount_storage(agent_pb2.Storage(driver="nfs", mount_point=str(tmp_path / "n")))
    with pytest.raises(InvalidArgumentError, match="absolute mount_point"):
        await mount_storage(agent_pb2.Storage(driver="9p", source="kataShared"))
