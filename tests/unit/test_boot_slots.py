"""Boots beyond the host's slots wait for one instead of starting."""

from __future__ import annotations

from pathlib import Path

import trio

from shim.sandbox.boot_slots import BootSlots, slot_count


def test_zero_means_one_slot_per_cpu() -> None:
    assert slot_count(3) == 3
    assert slot_count(0) >= 1


async def test_a_third_boot_waits_until_one_of_two_slots_is_free(tmp_path: Path) -> None:
    slots = BootSlots(tmp_path, 2)
    order: list[str] = []

    async def boot(name: str, seconds: float) -> None:
        async with slots.slot(name):
            order.append(f"{name} in")
            await trio.sleep(seconds)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(boot, "a", 0.3)
        nursery.start_soon(boot, "b", 0.6)
        await trio.sleep(0.05)
        nursery.start_soon(boot, "c", 0.1)
    assert order.index("c in") > order.index("a out")
    assert order.index("c in") < order.index("b out")


async def test_slots_are_shared_with_other_processes(tmp_path: Path) -> None:
    held = BootSlots(tmp_path, 1)
    async with held.slot("other shim"):
        other = BootSlots(tmp_path, 1)  # another process's view: its own fds
        with trio.move_on_after(0.2) as scope:
            async with other.slot("this shim"):
                pass
        assert scope.cancelled_caught
    async with other.slot("this shim") as waited:
        assert waited < 0.1
