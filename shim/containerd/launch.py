"""The short-lived ``start`` and ``delete`` actions of the shim binary.

``start`` (cwd: the bundle) makes the sandbox's state dir, binds the shim's
unix socket there, launches the long-lived serving shim in its own session
with the listening socket as fd 3, writes the bundle's ``address`` file and
prints ``unix://<socket>``; containerd reads stdout and stderr together
(``CombinedOutput``), so nothing else may be printed and the serving shim must
not inherit them. A container that the CRI annotations place in an existing
sandbox gets that sandbox's shim address instead.

``delete`` runs when containerd has lost a shim: it reclaims what the task left
(VM, mounts, sockets, state) and prints a ``DeleteResponse`` with exit status
137, as containerd-shim-runc-v2 does.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shim.resources import SOCKET_FILE, Resource
from shim.sandbox.annotations import placement
from shim.sandbox.state import SandboxState

ADDRESS_FILE = "address"
SERVE_FD = 3
#: how long ``start`` waits for a pool VM that got a claim but did not answer it
HANDOVER_SETTLE = 15.0
#: exit status containerd records for a task whose shim died (SIGKILL)
DEAD_SHIM_STATUS = 128 + 9


@dataclass(frozen=True)
class ShimArgs:
    """The flags containerd passes to every invocation of the shim binary."""

    namespace: str
    address: str
    publish_binary: str
    id: str
    bundle: str
    debug: bool


def socket_path(state_root: Path, sandbox_id: str) -> Path:
    """The serving shim's socket for a sandbox."""
    return state_root / sandbox_id / "shim.sock"


def can_connect(path: Path) -> bool:
    """Whether a shim is serving at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _read_annotations_spec(bundle: str) -> dict[str, object]:
    try:
        spec = json.loads((Path(bundle) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def start(
    args: ShimArgs,
    state_root: Path,
    sandbox_model: str,
    serve: Callable[[], int],
    claim: Callable[[], Path | None] | None = None,
) -> str:
    """Launch (or find) the shim serving this container; return its address.

    ``serve`` runs in the forked serving shim and returns its exit status.
    ``claim`` asks the VM pool for a VM whose process then serves the sandbox,
    returning that shim's socket (None: no VM; a shim is forked as without a pool).
    """
    spec = _read_annotations_spec(args.bundle)
    place = placement(args.id, spec, sandbox_model)
    if not place.owner:
        path = socket_path(state_root, place.sandbox_id)
        if can_connect(path):
            return _publish_address(args.bundle, path)
    elif claim is not None and not (state_root / args.id).exists():
        claimed = claim()
        if claimed is None and _settle_failed_handover(state_root / args.id):
            claimed = socket_path(state_root, args.id)  # it answered after all
        if claimed is not None:
            return _publish_address(args.bundle, claimed)
    state = SandboxState.create(state_root, args.id, args.namespace)
    path = state.socket
    if can_connect(path):
        # containerd retried start for a shim that is already serving
        return _publish_address(args.bundle, path)
    state.record(Resource(kind=SOCKET_FILE, path=str(path)))
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(128)
        _spawn_server(listener, args.bundle, serve)
    finally:
        listener.close()
    return _publish_address(args.bundle, path)


def _settle_failed_handover(directory: Path) -> bool:
    """A claim that got no answer may have left a pool VM's dir in the sandbox's place.

    Its process may still finish the hand-over (True: its socket answers), die
    (its dir is reclaimed) or hang (killed after ``HANDOVER_SETTLE`` s, its dir reclaimed);
    False once the place is free for a shim of this ``start``'s own.
    """
    from shim.sandbox import cleanup

    deadline = time.monotonic() + HANDOVER_SETTLE
    while (directory / "sandbox.json").exists():
        state = SandboxState.load(directory)
        if can_connect(state.socket):
            return True
        if not state.shim_alive() or time.monotonic() > deadline:
            cleanup.reclaim(state, kill_shim=True)
            return False
        time.sleep(0.1)
    return False


def _spawn_server(listener: socket.socket, bundle: str, serve: Callable[[], int]) -> None:
    """Fork the serving shim: this process's interpreter and imports carry over.

    Forking instead of exec'ing a new Python saves an interpreter start and the
    imports on the path of every container start. The child leaves
    containerd's session and stdio (containerd reads ``start``'s output to EOF)
    and serves on the listening socket as fd 3.
    """
    if os.fork() != 0:
        return
    code = 1
    try:
        os.setsid()
        os.chdir(bundle)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(listener.fileno(), SERVE_FD)
        os.closerange(SERVE_FD + 1, os.sysconf("SC_OPEN_MAX"))
        code = serve()
    finally:
        os._exit(code)


def _publish_address(bundle: str, path: Path) -> str:
    address = f"unix://{path}"
    tmp = Path(bundle) / f".{ADDRESS_FILE}.tmp"
    tmp.write_text(address)
    os.replace(tmp, Path(bundle) / ADDRESS_FILE)
    return address


def delete(args: ShimArgs, state_root: Path) -> tuple[int, float, list[str]]:
    """Reclaim a dead shim's task; returns (exit status, exit time, problems)."""
    from common import mounts
    from shim.sandbox import cleanup
    from shim.sandbox.state import find_container

    problems: list[str] = []
    state = find_container(state_root, args.id)
    if state is not None:
        if state.id == args.id or not state.shim_alive():
            problems += cleanup.reclaim(state, kill_shim=True)
        else:
            # the pod's shim still serves its other containers: only this one's share
            target = state.mounts_dir / args.id
            for point in mounts.mounts_under(target):
                try:
                    mounts.unmount(point)
                except mounts.MountError as e:
                    problems.append(str(e))
            state.remove_container(args.id)
    if args.bundle:
        try:
            mounts.unmount(Path(args.bundle) / "rootfs")
        except mounts.MountError as e:
            problems.append(str(e))
    return DEAD_SHIM_STATUS, time.time(), problems
