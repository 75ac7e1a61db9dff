"""Reclaiming a sandbox's host resources, from its record, after any kind of end.

Used by ``Shutdown`` (after the VM is destroyed, for what is left), by the
``delete`` action containerd runs when a shim died, and by ``husk cleanup``.
Besides what the record lists, every process whose command line names the
sandbox's state dir (the VMM, its helpers) is killed and every mount below
the dir is detached: what a hypervisor plugin made is found even if the crash
came between the plugin creating it and anyone recording it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import mounts
from shim import network
from shim.resources import (
    DIR,
    FILE,
    MOUNT,
    NET_INGRESS,
    NET_TAP,
    PROCESS,
    SOCKET_FILE,
    TAP,
    Resource,
    process_alive,
)
from shim.sandbox.state import SandboxState, sandboxes

log = logging.getLogger("husk.cleanup")

KILL_WAIT = 5.0


def processes_naming(directory: Path) -> list[int]:
    """Pids whose command line mentions ``directory`` (never this process)."""
    needle = (str(directory).rstrip("/") + "/").encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return found


def kill_and_wait(pids: list[int], timeout: float = KILL_WAIT) -> list[int]:
    """SIGKILL ``pids`` and wait until they are gone; returns those still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.warning("cannot kill %d: %s", pid, e)
    deadline = time.monotonic() + timeout
    left = [p for p in pids if process_alive(p)]
    # a zombie counts as gone: its parent (maybe a plugin's trio.Process) reaps it
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if process_alive(p)]
    return left


def reclaim(state: SandboxState, *, kill_shim: bool = False) -> list[str]:
    """Remove every host resource of the sandbox and its state dir.

    Returns the problems met, one line each (an empty list means all is gone).
    ``kill_shim`` also kills the recorded shim process (``delete`` of a hung shim).
    """
    problems: list[str] = []
    pids = [r.pid for r in state.resources if r.kind == PROCESS and process_alive(r.pid, r.start)]
    if kill_shim and state.shim_pid != os.getpid() and state.shim_alive():
        pids.append(state.shim_pid)
    if state.dir.exists():
        pids += [p for p in processes_naming(state.dir) if p not in pids]
    for pid in kill_and_wait(pids):
        problems.append(f"sandbox {state.id}: process {pid} survived SIGKILL")
    for resource in state.resources:
        if resource.kind != PROCESS:
            problems += _remove(resource)
    for point in mounts.mounts_under(state.dir):
        try:
            mounts.unmount(point)
        except mounts.MountError as e:
            problems.append(f"sandbox {state.id}: {e}")
    if not problems:
        shutil.rmtree(state.dir, ignore_errors=True)
        if state.dir.exists():
            problems.append(f"sandbox {state.id}: cannot remove {state.dir}")
    return problems


def _remove(resource: Resource) -> list[str]:
    try:
        if resource.kind == MOUNT:
            mounts.unmount(resource.path)
        elif resource.kind in (NET_TAP, NET_INGRESS):
            network.reclaim(network_entry(resource))
        elif resource.kind == TAP:
            subprocess.run(
                ["ip", "link", "delete", resource.name],
                capture_output=True,
                check=False,
            )
        elif resource.kind in (SOCKET_FILE, FILE):
            Path(resource.path).unlink(missing_ok=True)
        elif resource.kind == DIR:
            shutil.rmtree(resource.path, ignore_errors=True)
    except (OSError, mounts.MountError, network.NetworkError) as e:
        return [f"{resource.describe()}: {e}"]
    return []


def network_entry(resource: Resource) -> dict[str, str]:
    """The ``shim.network`` record a ``net-*`` resource stands for."""
    return {
        "kind": resource.kind.removeprefix("net-"),
        "netns": resource.path,
        "name": resource.name,
    }


def network_resource(entry: Mapping[str, Any]) -> Resource:
    """The resource to record for a ``shim.network`` record (``tap`` or ``ingress``)."""
    return Resource(kind=f"net-{entry['kind']}", path=str(entry["netns"]), name=str(entry["name"]))


def orphans(root: Path) -> list[SandboxState]:
    """Sandboxes under ``root`` whose shim is no longer running."""
    return [s for s in sandboxes(root) if not s.shim_alive()]


def reclaim_orphans(root: Path, *, dry_run: bool = False) -> tuple[list[SandboxState], list[str]]:
    """Reclaim every orphaned sandbox; returns them and the problems met."""
    found = orphans(root)
    problems: list[str] = []
    if not dry_run:
        for state in found:
            problems += reclaim(state)
    return found, problems
