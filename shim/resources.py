"""Host resources a sandbox creates, as its state record lists them.

The shim and the hypervisor plugins describe each resource the same way (a
``Resource``) and record it *before* creating it, through the recorder the
sandbox hands them (``VmSpec.record``), so ``husk cleanup`` and the shim's
``delete`` find everything a crash left. Processes carry their start time,
which guards against pid reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Resource kinds, reclaimed in this order (processes first: they hold the rest).
PROCESS = "process"
MOUNT = "mount"
TAP = "tap"
#: a tap in the pod's network namespace (``path`` is the netns, as ``shim.network`` records it)
NET_TAP = "net-tap"
#: an ingress qdisc + redirect husk put on a pod interface (``path`` is the netns)
NET_INGRESS = "net-ingress"
SOCKET_FILE = "socket"
FILE = "file"
DIR = "dir"
KINDS = (PROCESS, MOUNT, TAP, NET_TAP, NET_INGRESS, SOCKET_FILE, FILE, DIR)


@dataclass(frozen=True)
class Resource:
    """One host resource: a process, a mount, a tap, a socket, a file or a directory.

    The network kinds (``net-tap``, ``net-ingress``) live in a pod's namespace:
    ``path`` is that namespace and ``name`` the link.
    """

    kind: str
    path: str = ""
    pid: int = 0
    #: the process's start time (clock ticks since boot): guards against pid reuse
    start: int = 0
    name: str = ""

    def describe(self) -> str:
        """The resource in words, for logs and ``husk cleanup``."""
        if self.kind == PROCESS:
            return f"process {self.pid}" + (f" ({self.name})" if self.name else "")
        if self.kind == TAP:
            return f"tap {self.name}"
        if self.kind in (NET_TAP, NET_INGRESS):
            what = "tap" if self.kind == NET_TAP else "ingress redirect on"
            return f"{what} {self.name} in netns {self.path}"
        return f"{self.kind} {self.path}"


def process_start_time(pid: int) -> int:
    """Field 22 of ``/proc/<pid>/stat``, or 0 when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # the command name (field 2) may hold spaces and parentheses: split after it
    return int(stat.rpartition(")")[2].split()[19])


def process_alive(pid: int, start: int = 0) -> bool:
    """Whether ``pid`` runs and (if ``start`` is known) is still the same process."""
    if pid <= 0:
        return False
    now = process_start_time(pid)
    if now == 0:
        return False
    if _is_zombie(pid):
        return False
    return start == 0 or now == start


def pss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """The proportional set size of ``pid`` (0 if it is gone)."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
