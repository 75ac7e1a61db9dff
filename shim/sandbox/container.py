"""Containers and their processes as the task service sees them.

A :class:`Process` is the init process of a container (``exec_id == ""``) or
an exec'd one. Its life is CREATED → RUNNING (⇄ PAUSED) → STOPPED; ``exited``
is set once its exit status is known, which is also when ``Wait`` returns.
The guest's pids are not visible on the host; every process reports the pid
of its shim, as other VM runtimes report their VMM's.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf import timestamp_pb2

from agent_proto import mount_pb2, oci_pb2, task_types_pb2
from shim.containerd.stdio import Outputs, StdioPaths, StdioPump
from shim.errors import NotFoundError
from shim.sandbox.rootfs import SharedRootfs

Status = task_types_pb2.Status

#: exit status when the sandbox went away under a process (as if SIGKILLed)
KILLED_STATUS = 128 + 9


def timestamp(when: datetime.datetime | None) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp (the zero time for None)."""
    stamp = timestamp_pb2.Timestamp()
    if when is not None:
        stamp.FromDatetime(when)
    return stamp


def now() -> datetime.datetime:
    """The current time, as containerd records exit times (UTC)."""
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Process:
    """One process of a container, init or exec'd."""

    container_id: str
    exec_id: str
    stdio: StdioPaths
    spec: oci_pb2.Process | None = None
    status: int = Status.CREATED
    pid: int = field(default_factory=os.getpid)
    exit_status: int = 0
    exited_at: datetime.datetime | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    pump: StdioPump | None = None
    waiting: bool = False
    #: where stdout and stderr go (None: containerd's FIFOs), set before the process runs
    outputs: Outputs | None = None

    @property
    def label(self) -> str:
        """``cid`` or ``cid/exec`` for messages."""
        return self.container_id + (f"/{self.exec_id}" if self.exec_id else "")

    def set_exited(self, status: int) -> None:
        """Record the exit; wakes every ``Wait``."""
        if self.exited.is_set():
            return
        self.status = Status.STOPPED
        self.exit_status = status
        self.exited_at = now()
        self.exited.set()

    def state(self, bundle: str) -> dict[str, Any]:
        """The fields of a ``StateResponse``."""
        return {
            "id": self.container_id,
            "exec_id": self.exec_id,
            "bundle": bundle,
            "pid": self.pid,
            "status": self.status,
            "stdin": self.stdio.stdin,
            "stdout": self.stdio.stdout,
            "stderr": self.stdio.stderr,
            "terminal": self.stdio.terminal,
            "exit_status": self.exit_status,
            "exited_at": timestamp(self.exited_at),
        }


@dataclass
class Container:
    """A container in a sandbox: its bundle, rootfs share and processes."""

    id: str
    bundle: str
    rootfs_mounts: list[mount_pb2.Mount]
    init: Process
    shared: SharedRootfs
    execs: dict[str, Process] = field(default_factory=dict)

    def process(self, exec_id: str) -> Process:
        """The init process (``""``) or an exec'd one; NotFound otherwise."""
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFoundError(f"container {self.id}: no exec process {exec_id!r}") from None

    def processes(self) -> list[Process]:
        """Init first, then the exec'd processes."""
        return [self.init, *self.execs.values()]
