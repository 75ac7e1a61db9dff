"""The record of a sandbox's host resources, kept in its state directory.

Each sandbox owns ``<state_dir>/<sandbox_id>/`` (mode 0700, as is ``state_dir``
itself: nothing in it is any other host user's business) and a
``sandbox.json`` in it::

    {"id": "...", "namespace": "default", "shim_pid": 1234, "shim_start": 5678,
     "containers": ["c1"], "resources": [{"kind": "mount", "path": "..."}, ...],
     "hypervisor": "qemu", "created": 1767225600.0, "vcpus": 1, "memory_mib": 512,
     "status": "running", "debug_console": {"kind": "serial", "path": "..."}}

The last six are for operators (``husk sandbox ls``, ``husk exec``); a record
written before they existed reads with their defaults.

A resource is written to the record **before** it is created and dropped only
after it is gone, so ``delete``, ``Shutdown`` and ``husk cleanup`` can reclaim
everything a crashed shim left (see :mod:`shim.sandbox.cleanup`). The file is replaced
atomically (write + rename), so a crash never leaves half a record.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shim import identifiers
from shim.resources import Resource, process_alive, process_start_time

#: numbers the record's temp files, so concurrent writes never share one
_WRITES = itertools.count()

RECORD = "sandbox.json"
SOCKET = "shim.sock"
SHARED = "shared"
MOUNTS = "mounts"
#: every directory from ``[runtime] state_dir`` down
DIR_MODE = 0o700


def make_private_dir(path: Path) -> None:
    """``mkdir -p`` ending in a 0700 directory.

    Only a directory made here is set to 0700: an existing one keeps its mode,
    since husk never changes a directory it did not create (``/run``, the
    parent of the default template path, must stay 0755).
    """
    try:
        path.mkdir(parents=True, mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    # mkdir's mode passes through the umask; the directory is exactly 0700
    path.chmod(DIR_MODE)


#: where the serving shim answers ``GET /metrics`` (Prometheus text)
METRICS_SOCKET = "metrics.sock"

#: ``status`` of a sandbox while its shim lives
BOOTING, RUNNING, STOPPING = "booting", "running", "stopping"
#: ``status`` of a VM pool's VM, booted and waiting for a sandbox to claim it
POOLED = "pooled"


@dataclass
class SandboxState:
    """The state directory of one sandbox and its resource record."""

    dir: Path
    id: str
    namespace: str = ""
    shim_pid: int = 0
    shim_start: int = 0
    containers: list[str] = field(default_factory=list)
    resources: list[Resource] = field(default_factory=list)
    hypervisor: str = ""
    #: wall-clock time (seconds since the epoch) the sandbox was made
    created: float = 0.0
    vcpus: int = 0
    memory_mib: int = 0
    status: str = BOOTING
    #: where ``husk exec`` reaches the guest's debug console (``{}``: none)
    debug_console: dict[str, Any] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        """Where the sandbox's shim serves containerd."""
        return self.dir / SOCKET

    @property
    def metrics_socket(self) -> Path:
        """Where the sandbox's shim serves Prometheus metrics."""
        return self.dir / METRICS_SOCKET

    @property
    def shared_dir(self) -> Path:
        """What the guest sees: a read-only view of ``mounts_dir`` (see ``shim.sandbox.share``)."""
        return self.dir / SHARED

    @property
    def mounts_dir(self) -> Path:
        """Where the host makes every mount point: never exported, never guest-writable."""
        return self.dir / MOUNTS

    @classmethod
    def create(cls, root: Path, sandbox_id: str, namespace: str = "") -> SandboxState:
        """Make ``root/<sandbox_id>`` and its record (an existing record is reused)."""
        identifiers.validate("sandbox", sandbox_id)
        make_private_dir(root)
        directory = root / sandbox_id
        if (directory / RECORD).exists():
            state = cls.load(directory)
            state.namespace = namespace or state.namespace
            return state
        make_private_dir(directory)
        state = cls(dir=directory, id=sandbox_id, namespace=namespace)
        state.save()
        return state

    @classmethod
    def load(cls, directory: Path) -> SandboxState:
        """Read a record; a missing or garbled one yields an empty record for ``directory``."""
        try:
            raw: dict[str, Any] = json.loads((directory / RECORD).read_text())
        except (OSError, ValueError):
            return cls(dir=directory, id=directory.name)
        return cls(
            dir=directory,
            id=str(raw.get("id", directory.name)),
            namespace=str(raw.get("namespace", "")),
            shim_pid=int(raw.get("shim_pid", 0)),
            shim_start=int(raw.get("shim_start", 0)),
            containers=[str(c) for c in raw.get("containers", [])],
            resources=[Resource(**r) for r in raw.get("resources", [])],
            hypervisor=str(raw.get("hypervisor", "")),
            created=float(raw.get("created", 0.0)),
            vcpus=int(raw.get("vcpus", 0)),
            memory_mib=int(raw.get("memory_mib", 0)),
            status=str(raw.get("status", BOOTING)),
            debug_console=dict(raw.get("debug_console") or {}),
        )

    def save(self) -> None:
        """Atomically rewrite the record."""
        data = {
            "id": self.id,
            "namespace": self.namespace,
            "shim_pid": self.shim_pid,
            "shim_start": self.shim_start,
            "containers": self.containers,
            "resources": [asdict(r) for r in self.resources],
            "hypervisor": self.hypervisor,
            "created": self.created,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "status": self.status,
            "debug_console": self.debug_console,
        }
        # one name per write: the shim saves from trio's threads too, and two writers
        # sharing a temp name would rename each other's file away
        tmp = self.dir / f".{RECORD}.{os.getpid()}.{threading.get_ident()}.{next(_WRITES)}"
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.dir / RECORD)
        except FileNotFoundError:
            if self.dir.exists():
                raise
            # the sandbox's dir went with its teardown: there is nothing left to record,
            # and the error that ended the sandbox is the one to report

    def claim(self, pid: int) -> None:
        """Note ``pid`` as the shim serving this sandbox."""
        self.shim_pid = pid
        self.shim_start = process_start_time(pid)
        self.save()

    def describe_vm(self, hypervisor: str, vcpus: int, memory_mib: int) -> None:
        """Note what the sandbox runs on, and when it was made (kept if already known)."""
        self.hypervisor, self.vcpus, self.memory_mib = hypervisor, vcpus, memory_mib
        self.created = self.created or time.time()
        self.save()

    def set_debug_console(self, endpoint: dict[str, Any]) -> None:
        """Where ``husk exec`` reaches the guest's shell (``{}``: the sandbox has none)."""
        if endpoint != self.debug_console:
            self.debug_console = endpoint
            self.save()

    def set_status(self, status: str) -> None:
        """``booting``, ``running`` or ``stopping``, for ``husk sandbox ls``."""
        if status != self.status:
            self.status = status
            self.save()

    def shim_alive(self) -> bool:
        """Whether the recorded shim process still runs."""
        return process_alive(self.shim_pid, self.shim_start)

    def record(self, resource: Resource) -> Resource:
        """Add ``resource`` to the record (call before creating it)."""
        if resource not in self.resources:
            self.resources.append(resource)
            self.save()
        return resource

    def forget(self, resource: Resource) -> None:
        """Drop ``resource`` from the record (call after it is gone)."""
        if resource in self.resources:
            self.resources.remove(resource)
            self.save()

    def add_container(self, container_id: str) -> None:
        """Note a container served in this sandbox."""
        if container_id not in self.containers:
            self.containers.append(container_id)
            self.save()

    def remove_container(self, container_id: str) -> None:
        """Forget a container."""
        if container_id in self.containers:
            self.containers.remove(container_id)
            self.save()


def sandboxes(root: Path) -> Iterator[SandboxState]:
    """Every sandbox state directory under ``root``."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_dir() and (entry / RECORD).exists():
            yield SandboxState.load(entry)


def find_container(root: Path, container_id: str) -> SandboxState | None:
    """The sandbox that holds ``container_id`` (its own, or the pod's)."""
    own = root / container_id
    if (own / RECORD).exists():
        return SandboxState.load(own)
    for state in sandboxes(root):
        if container_id in state.containers:
            return state
    return None
