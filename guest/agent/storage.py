"""Mounts in the guest: shared directories, block devices, the ``storages`` of a request.

A ``Storage`` names a driver and a mount point:

- ``9p``: ``source`` is the virtio-9p mount tag (the shim's share is ``kataShared``,
  mounted at ``/run/kata-containers/shared/containers``, as in Kata);
- ``virtio-fs``: ``source`` is the virtio-fs tag;
- ``blk`` (also ``virtio-blk``, ``virtio-blk-pci``, ``scsi``): ``source`` is ``/dev/...``,
  a PCI path ``02/01`` (slot of each bridge on the way), or the disk's virtio
  serial; the agent waits for the hot-plugged disk and mounts it with ``fstype``;
- ``local``: an empty directory the agent creates (``options`` may hold ``mode=0777``);
- ``bind``: ``source`` is a guest path bind-mounted at ``mount_point``.

Mounting uses the mount(2) system call directly, not a ``mount`` binary.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from agent_proto import agent_pb2
from common.errors import DeadlineExceededError, InvalidArgumentError
from common.mounts import MountError, mount, unmount

log = logging.getLogger("husk.agent.storage")

DEVICE_TIMEOUT = 10.0


@dataclass(frozen=True)
class SysfsLayout:
    """Where the agent looks for devices; tests point it at a fake tree."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")


def find_block_by_serial(serial: str, layout: SysfsLayout) -> Path | None:
    """Return ``/dev/<name>`` of the disk whose virtio serial is ``serial``."""
    by_id = layout.dev / "disk" / "by-id" / f"virtio-{serial}"
    if by_id.exists():
        return by_id
    for block in sorted((layout.sys / "block").glob("*")):
        try:
            if (block / "serial").read_text().strip() == serial:
                return layout.dev / block.name
        except OSError:
            continue
    return None


def find_block_by_pci_path(pci_path: str, layout: SysfsLayout) -> Path | None:
    """Return ``/dev/<name>`` of the disk at PCI path ``bb/dd[/...]`` (hex slots)."""
    slots = pci_path.strip("/").split("/")
    try:
        numbers = [int(s, 16) for s in slots]
    except ValueError:
        return None
    device = layout.sys / "devices" / "pci0000:00"
    for number in numbers:
        matches = sorted(device.glob(f"0000:*:{number:02x}.0"))
        if not matches:
            return None
        device = matches[0]
    for block in sorted(device.glob("**/block/*")):
        return layout.dev / block.name
    return None


def looks_like_pci_path(source: str) -> bool:
    """``02/01``-style PCI paths, as Kata's runtime sends them."""
    parts = source.split("/")
    return all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts)


async def wait_for_block_device(
    source: str, layout: SysfsLayout, timeout: float = DEVICE_TIMEOUT
) -> Path:
    """Resolve a ``blk`` storage source to a device node, waiting for hot-plug."""
    with trio.move_on_after(timeout):
        while True:
            if source.startswith("/dev/"):
                found: Path | None = Path(source) if Path(source).exists() else None
            elif looks_like_pci_path(source):
                found = find_block_by_pci_path(source, layout)
            else:
                found = find_block_by_serial(source, layout)
            if found is not None and found.exists():
                return found
            await trio.sleep(0.05)
    raise DeadlineExceededError(f"block device {source!r} did not appear within {timeout:g}s")


BLOCK_DRIVERS = {"blk", "virtio-blk", "virtio-blk-pci", "virtio-blk-ccw", "scsi", "nvdimm"}
STORAGE_DRIVERS = ["9p", "virtio-fs", "local", "bind", *sorted(BLOCK_DRIVERS)]


async def mount_storage(storage: agent_pb2.Storage, layout: SysfsLayout = SysfsLayout()) -> str:
    """Mount one storage at its mount point (created if needed); return the mount point."""
    target = storage.mount_point
    if not target or not os.path.isabs(target):
        raise InvalidArgumentError(
            f"storage {storage.source!r} ({storage.driver}) needs an absolute mount_point"
        )
    os.makedirs(target, exist_ok=True)
    driver = storage.driver
    options = list(storage.options)
    if driver == "9p":
        if not any(o.startswith("trans=") for o in options):
            options = ["trans=virtio", "version=9p2000.L", *options]
        mount(storage.source, target, storage.fstype or "9p", options)
    elif driver == "virtio-fs":
        mount(storage.source, target, "virtiofs", options)
    elif driver in BLOCK_DRIVERS:
        device = await wait_for_block_device(storage.source, layout)
        if not storage.fstype:
            raise InvalidArgumentError(f"block storage {storage.source!r} has no fstype")
        mount(str(device), target, storage.fstype, options)
    elif driver == "local":
        mode = next((o.split("=", 1)[1] for o in options if o.startswith("mode=")), "0777")
        os.chmod(target, int(mode, 8))
        return target
    elif driver == "bind":
        mount(storage.source, target, "", ["rbind", *options])
    else:
        raise InvalidArgumentError(
            f"storage driver {driver!r} is not supported (supported: {', '.join(STORAGE_DRIVERS)})"
        )
    log.info("mounted %s storage %s at %s", driver, storage.source, target)
    return target


async def mount_storages(
    storages: Iterable[agent_pb2.Storage], layout: SysfsLayout = SysfsLayout()
) -> list[str]:
    """Mount storages in order; on failure unmount those already done and re-raise."""
    done: list[str] = []
    try:
        for storage in storages:
            done.append(await mount_storage(storage, layout))
    except BaseException:
        unmount_all(done)
        raise
    return done


def unmount_all(targets: Iterable[str]) -> list[str]:
    """Unmount in reverse order; return the failures as messages (never raises)."""
    failures = []
    for target in reversed(list(targets)):
        try:
            unmount(target)
        except MountError as exc:
            failures.append(str(exc))
    return failures
