"""Boot slots: at most N VM boots at once on this host, across every shim.

A boot is CPU-bound (seconds of it under TCG). Ten sandboxes started at once
on two CPUs would each get a fifth of the time they need, and all of them
would pass the agent's deadline together; queued, they start one after the
other and each answers. Every shim is its own process, so the slots are
files under the state dir, each held with ``flock`` while a VM boots: the
kernel drops a lock when its holder dies, so a crashed shim never keeps a
slot. A sandbox takes a slot before its VMM starts and gives it back once the
agent answers (or the boot fails); the agent's deadline counts from the slot.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from shim.sandbox.state import make_private_dir

log = logging.getLogger("husk.sandbox.boot")

SLOTS_DIR = ".boot-slots"
#: how often a queued boot looks for a free slot
POLL = 0.05


def slot_count(configured: int) -> int:
    """``[runtime] max_parallel_boots``, 0 meaning one per CPU."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


class BootSlots:
    """``count`` flock'd slot files in ``<state_dir>/.boot-slots``."""

    def __init__(self, state_root: Path, count: int) -> None:
        self.directory = state_root / SLOTS_DIR
        self.count = count

    def _try(self) -> int | None:
        make_private_dir(self.directory)
        for index in range(self.count):
            path = self.directory / f"slot-{index}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    async def acquire(self, what: str) -> Slot:
        """Wait for a free slot and hold it until ``Slot.release``."""
        started = trio.current_time()
        fd = self._try()
        if fd is None:
            log.info("%s: all %d boot slots are taken; waiting", what, self.count)
        while fd is None:
            await trio.sleep(POLL)
            fd = self._try()
        return Slot(fd, trio.current_time() - started)

    @asynccontextmanager
    async def slot(self, what: str) -> AsyncIterator[float]:
        """Hold a slot for the block; yields how long the wait for it took."""
        held = await self.acquire(what)
        try:
            yield held.waited
        finally:
            held.release()


class Slot:
    """A held boot slot (an flock'd fd); ``release`` is idempotent."""

    def __init__(self, fd: int, waited: float) -> None:
        self._fd: int | None = fd
        #: seconds spent waiting for it
        self.waited = waited

    def release(self) -> None:
        """Give the slot back (closing the only fd releases the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
