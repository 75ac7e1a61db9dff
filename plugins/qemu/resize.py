"""vCPU and memory hot-plug over QMP: what ``QemuHypervisor.resize`` does.

vCPUs: ``-smp N,maxcpus=M`` leaves ``M - N`` empty CPU slots (on q35, ACPI CPU
hot-plug); ``query-hotpluggable-cpus`` lists every slot with the ``props``
(socket, core, thread ids) that ``device_add`` needs, and a ``qom-path`` once
filled. A hot-added CPU starts offline in the guest: the agent's
``OnlineCPUMem`` brings it up. Unplug is ``device_del`` plus the guest's ACPI
eject, confirmed by ``DEVICE_DELETED``; the driver offers it only under KVM,
because under TCG QEMU 7.2 corrupts its heap on the next CPU add after an unplug.

Memory: one ``virtio-mem-pci`` device (see ``cmdline.memory_hotplug_args``)
plugged with nothing at boot. Setting its ``requested-size`` asks the guest
driver to plug or unplug 2 MiB blocks; the device's ``size`` is what the guest
has actually plugged, so it is both the confirmation and the read-back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from plugins.qemu.cmdline import VIRTIO_MEM_BLOCK_MIB, VIRTIO_MEM_ID
from plugins.qemu.qmp import QmpClient
from plugins.qemu.qmp_events import QmpEvent
from shim.errors import DeadlineExceededError, HypervisorError

log = logging.getLogger("husk.qemu.resize")

MIB = 1 << 20
VIRTIO_MEM_PATH = f"/machine/peripheral/{VIRTIO_MEM_ID}"
#: hot-added vCPUs get ids ``vcpu<n>``, so they show up as /machine/peripheral/vcpu<n>
VCPU_PREFIX = "vcpu"
_PERIPHERAL = "/machine/peripheral/"
_POLL = 0.02


async def cpu_slots(qmp: QmpClient) -> list[Mapping[str, Any]]:
    """Every CPU slot, ordered by topology (socket, die, core, thread)."""
    slots = await qmp.execute("query-hotpluggable-cpus")
    if not isinstance(slots, list):
        raise HypervisorError(f"qemu: query-hotpluggable-cpus returned {slots!r}")

    def key(slot: Mapping[str, Any]) -> tuple[int, ...]:
        props = slot.get("props", {})
        return tuple(int(props.get(k, 0)) for k in ("socket-id", "die-id", "core-id", "thread-id"))

    return sorted(slots, key=key)


def plugged(slots: Sequence[Mapping[str, Any]]) -> int:
    """How many vCPUs the VM has."""
    return sum(1 for slot in slots if slot.get("qom-path"))


async def add_vcpus(qmp: QmpClient, count: int) -> None:
    """Fill the first ``count`` empty CPU slots."""
    slots = await cpu_slots(qmp)
    empty = [slot for slot in slots if not slot.get("qom-path")]
    if count > len(empty):
        raise HypervisorError(f"qemu: {count} vCPUs wanted but only {len(empty)} slots are free")
    taken = {_peripheral_id(slot) for slot in slots}
    index = 0
    for slot in empty[:count]:
        while f"{VCPU_PREFIX}{index}" in taken:
            index += 1
        device_id = f"{VCPU_PREFIX}{index}"
        taken.add(device_id)
        await qmp.execute(
            "device_add", {"driver": slot["type"], "id": device_id, **dict(slot["props"])}
        )


async def remove_vcpus(qmp: QmpClient, count: int, timeout: float) -> None:
    """Unplug the ``count`` highest hot-added vCPUs, each once the guest released it."""
    hot = [i for i in (_peripheral_id(s) for s in await cpu_slots(qmp)) if i]
    for device_id in reversed(hot[-count:] if count else []):

        def released(event: QmpEvent, device_id: str = device_id) -> bool:
            return event.data.get("device") == device_id

        async with qmp.listen("DEVICE_DELETED") as deleted:
            await qmp.execute("device_del", {"id": device_id})
            with trio.move_on_after(timeout) as scope:
                await deleted.wait_for(released)
        if scope.cancelled_caught:
            raise DeadlineExceededError(
                f"qemu: the guest did not release vCPU {device_id} within {timeout:g} s"
            )


def _peripheral_id(slot: Mapping[str, Any]) -> str:
    path = str(slot.get("qom-path") or "")
    return path[len(_PERIPHERAL) :] if path.startswith(_PERIPHERAL) else ""


async def plugged_memory_mib(qmp: QmpClient) -> int:
    """MiB the guest has plugged through the virtio-mem device."""
    size = await qmp.execute("qom-get", {"path": VIRTIO_MEM_PATH, "property": "size"})
    return int(size) // MIB


async def set_memory(qmp: QmpClient, mib: int, timeout: float, *, must_reach: bool) -> int:
    """Ask the guest for ``mib`` of hot-plugged memory; return what it has plugged.

    Growing (``must_reach``) fails with DeadlineExceeded if the guest has not
    plugged it all within ``timeout``; shrinking returns what the guest gave
    back by then (memory in use may stay, and the guest keeps trying).
    """
    mib += -mib % VIRTIO_MEM_BLOCK_MIB
    await qmp.execute(
        "qom-set", {"path": VIRTIO_MEM_PATH, "property": "requested-size", "value": mib * MIB}
    )
    reached = await plugged_memory_mib(qmp)
    with trio.move_on_after(timeout):
        while reached != mib:
            await trio.sleep(_POLL)
            reached = await plugged_memory_mib(qmp)
    if reached < mib and must_reach:
        raise DeadlineExceededError(
            f"qemu: the guest plugged {reached} of {mib} MiB of hot-added memory within "
            f"{timeout:g} s (is virtio_mem loaded in the guest?)"
        )
    if reached != mib:
        log.info("the guest still holds %d MiB of hot-plugged memory (asked: %d)", reached, mib)
    return reached
