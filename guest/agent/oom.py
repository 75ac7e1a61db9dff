"""OOM kills in the containers' cgroups, reported through ``GetOOMEvent``.

cgroup v2 counts a cgroup's OOM kills in ``memory.events`` (``oom_kill``), and
kernfs wakes pollers of that file with EPOLLPRI when a count changes. The
watcher keeps one open fd per container in an epoll set of its own, registered
for EPOLLPRI only (kernfs always reports EPOLLIN, so trio's own readiness
would spin), and waits in trio for that set's fd to become readable. It then
re-reads each file that changed (the read also re-arms kernfs) and queues the
container's id once for every rise of ``oom_kill``: one OOM brings 6-8
notifications, with ``max`` and ``oom`` moving first, so only the kill counter
decides. Files are read again before a container is removed, because its
cgroup and the counter go with it.

The queue is bounded: while no ``GetOOMEvent`` waits (no shim attached),
events past the bound are dropped with a warning instead of growing memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("husk.agent.oom")

QUEUE_LIMIT = 64
_READ_SIZE = 4096


def oom_kills(text: str) -> int:
    """The ``oom_kill`` counter of a ``memory.events`` file's text (0 if absent)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


@dataclass
class _Watched:
    container_id: str
    fd: int
    kills: int


class OomWatcher:
    """Watches ``memory.events`` of each container; ``next_event`` yields OOM-killed ids."""

    def __init__(self, queue_limit: int = QUEUE_LIMIT) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Watched] = {}
        self._by_id: dict[str, _Watched] = {}
        self._send, self._receive = trio.open_memory_channel[str](queue_limit)

    def watch(self, container_id: str, cgroup: Path) -> None:
        """Start counting the OOM kills of the cgroup directory ``cgroup``.

        Without ``memory.events`` (cgroup v1, no memory controller) there is
        nothing to watch and this does nothing.
        """
        self.unwatch(container_id)
        try:
            fd = os.open(cgroup / "memory.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("no OOM events for %s: %s", container_id, exc)
            return
        watched = _Watched(container_id, fd, 0)
        watched.kills = self._read(watched) or 0
        try:
            self._epoll.register(fd, select.EPOLLPRI)
        except OSError as exc:  # not a kernfs file: it is still read at check and unwatch
            log.debug("cannot poll %s's memory.events: %s", container_id, exc)
        self._by_fd[fd] = watched
        self._by_id[container_id] = watched

    def check(self, container_id: str) -> None:
        """Read the container's counter now and queue an event if it rose."""
        watched = self._by_id.get(container_id)
        if watched is not None:
            self._update(watched)

    def unwatch(self, container_id: str) -> None:
        """Read the counter a last time, then stop watching the container."""
        watched = self._by_id.pop(container_id, None)
        if watched is None:
            return
        self._update(watched)
        self._close(watched)

    def clear(self) -> None:
        """Stop watching every container and drop the events nobody has read.

        For a sandbox's reset: the watcher itself stays (its ``run`` belongs to
        the server's nursery), but the next sandbox hears nothing of the last one.
        """
        for container_id in list(self._by_id):
            self.unwatch(container_id)
        while True:
            try:
                dropped = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            log.info("OOM event of %s dropped: its sandbox was reset", dropped)

    async def run(self) -> None:
        """Wait for kernfs notifications and turn rising counters into events."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    watched = self._by_fd.get(fd)
                    if watched is not None:
                        self._update(watched)
        finally:
            for watched in list(self._by_fd.values()):
                self._close(watched)
            self._epoll.close()

    async def next_event(self) -> str:
        """Block until a container has an OOM kill; its id."""
        return await self._receive.receive()

    def _update(self, watched: _Watched) -> None:
        kills = self._read(watched)
        if kills is None:  # the cgroup is gone: its fd would report EPOLLERR forever
            self._by_id.pop(watched.container_id, None)
            self._close(watched)
            return
        if kills > watched.kills:
            log.info("container %s: OOM kill (%d so far)", watched.container_id, kills)
            try:
                self._send.send_nowait(watched.container_id)
            except trio.WouldBlock:
                log.warning("OOM event of %s dropped: nobody reads them", watched.container_id)
        watched.kills = kills

    def _read(self, watched: _Watched) -> int | None:
        try:
            os.lseek(watched.fd, 0, os.SEEK_SET)
            return oom_kills(os.read(watched.fd, _READ_SIZE).decode(errors="replace"))
        except OSError:
            return None

    def _close(self, watched: _Watched) -> None:
        if self._by_fd.pop(watched.fd, None) is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(watched.fd)
        os.close(watched.fd)
