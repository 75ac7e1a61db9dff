"""Hot-adding and hot-removing devices over QMP, each undone on failure.

A disk is a ``blockdev-add`` (format node over a file node) plus a
``virtio-blk-pci`` on a free root port; a NIC is a ``netdev_add`` of a tap (by
name, or by fds passed with ``getfd``) plus a ``virtio-net-pci``. Removal asks
the guest with ``device_del`` and returns only once QEMU reports
``DEVICE_DELETED`` for the device, then drops the backend.
"""

from __future__ import annotations

import contextlib
import os

import trio

from plugins.qemu.cmdline import (
    QemuSettings,
    block_device_options,
    blockdev_options,
    net_device_options,
    netdev_id,
    netdev_options,
    node_name,
)
from plugins.qemu.qmp import QmpClient
from plugins.qemu.qmp_errors import QmpError
from shim.errors import DeadlineExceededError
from shim.hypervisor import BlockDevice, Device, NetDevice, VsockDevice


async def add_block(
    qmp: QmpClient, device: BlockDevice, bus: str, settings: QemuSettings, fdset: int
) -> None:
    """Attach a disk on ``bus``; the shim opens it and QEMU gets the fd (``add-fd``).

    QEMU never opens the path itself, so a disk works the same whether QEMU
    runs as root or, with ``run_as``, as a user who could not open it. The fd
    set is dropped once the block node holds its own copy.
    """
    flags = os.O_RDONLY if device.readonly else os.O_RDWR
    fd = os.open(device.path, flags | os.O_CLOEXEC)
    try:
        await qmp.execute("add-fd", {"fdset-id": fdset}, fds=[fd])
    finally:
        os.close(fd)
    try:
        await qmp.execute("blockdev-add", blockdev_options(device, f"/dev/fdset/{fdset}"))
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(QmpError):
            await qmp.execute("remove-fd", {"fdset-id": fdset})
    try:
        await qmp.execute("device_add", block_device_options(device, bus, settings))
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(QmpError):
            await qmp.execute("blockdev-del", {"node-name": node_name(device)})
        raise


async def add_net(qmp: QmpClient, device: NetDevice, bus: str, settings: QemuSettings) -> None:
    """Attach a NIC on ``bus``; tap fds travel over the QMP socket (SCM_RIGHTS)."""
    names = [f"fd-{device.id}-{i}" for i in range(len(device.tap_fds))]
    for fd, name in zip(device.tap_fds, names, strict=True):
        await qmp.execute("getfd", {"fdname": name}, fds=[fd])
    try:
        await qmp.execute("netdev_add", netdev_options(device, names if names else None))
    except BaseException:
        with trio.CancelScope(shield=True):
            for name in names:
                with contextlib.suppress(QmpError):
                    await qmp.execute("closefd", {"fdname": name})
        raise
    try:
        await qmp.execute("device_add", net_device_options(device, bus, settings))
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(QmpError):
            await qmp.execute("netdev_del", {"id": netdev_id(device)})
        raise


async def add_vsock(qmp: QmpClient, device: VsockDevice, bus: str, settings: QemuSettings) -> None:
    """Attach a vhost-vsock device on ``bus``."""
    driver = "vhost-vsock-pci" if settings.pcie else "vhost-vsock-device"
    await qmp.execute(
        "device_add", {"driver": driver, "id": device.id, "guest-cid": device.guest_cid, "bus": bus}
    )


async def remove(qmp: QmpClient, device: Device, timeout: float) -> None:
    """Unplug ``device``, wait for the guest to release it, then drop its backend."""
    async with qmp.listen("DEVICE_DELETED") as deleted:
        await qmp.execute("device_del", {"id": device.id})
        with trio.move_on_after(timeout) as scope:
            await deleted.wait_for(lambda event: event.data.get("device") == device.id)
    if scope.cancelled_caught:
        raise DeadlineExceededError(
            f"device {device.id}: the guest did not release it within {timeout:g} s "
            "(is the guest running and its PCIe hot-plug driver loaded?)"
        )
    if isinstance(device, BlockDevice):
        await qmp.execute("blockdev-del", {"node-name": node_name(device)})
    elif isinstance(device, NetDevice):
        await qmp.execute("netdev_del", {"id": netdev_id(device)})
