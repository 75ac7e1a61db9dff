"""The long-lived shim process: the task service on the socket ``start`` bound.

It serves ``containerd.task.v2.Task`` and ``containerd.task.v3.Task`` (one set of
handlers), and containerd 2's ``containerd.runtime.sandbox.v1.Sandbox`` (for
``sandboxer = "shim"``: :mod:`shim.containerd.sandbox_service`) on fd 3
(passed by ``start``), logs to the bundle's ``log`` FIFO that containerd reads,
publishes events to ``TTRPC_ADDRESS``, serves Prometheus metrics on
``metrics.sock`` in the sandbox's state dir and, as soon as it runs, begins
booting the sandbox its bundle names, sized for that container's limits, so
the VM boots while containerd prepares the ``Create`` call. It
exits after ``Shutdown`` (or SIGTERM) once the sandbox and every host resource
it recorded are gone.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from agent_proto import sandbox_pb2, task_pb2, task_v3_pb2
from shim import network
from shim.config import Config
from shim.containerd.events import Publisher, RecordingPublisher, TtrpcPublisher
from shim.containerd.launch import SERVE_FD, ShimArgs
from shim.containerd.sandbox_service import SandboxService
from shim.containerd.task_service import TaskService
from shim.errors import HuskError
from shim.lograte import RateLimit
from shim.resources import SOCKET_FILE, Resource
from shim.sandbox import cleanup, factory, oci
from shim.sandbox.annotations import placement
from shim.sandbox.boot import BootedVm
from shim.sandbox.sandbox import Sandbox
from shim.sandbox.state import METRICS_SOCKET, SandboxState
from ttrpc import Server

log = logging.getLogger("husk.shim")

#: containerd.task.v2.Task and containerd.task.v3.Task: the same RPCs and messages;
#: which one containerd calls follows what ``start`` printed (``bootstrap``)
TASK_SERVICES = (
    task_pb2.DESCRIPTOR.services_by_name["Task"],
    task_v3_pb2.DESCRIPTOR.services_by_name["Task"],
)
#: what containerd 2's shim sandbox controller calls (plugins/sandbox/controller.go)
SANDBOX_SERVICE = sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"]
SHUTDOWN_GRACE = 2.0
PEER_POLL = 0.02


def log_level(args: ShimArgs, config: Config | HuskError) -> int:
    """``-debug`` from containerd wins; else ``[runtime] log_level``."""
    if args.debug:
        return logging.DEBUG
    name = config.runtime.log_level if isinstance(config, Config) else "info"
    return logging.getLevelNamesMapping()[name.upper()]


def setup_logging(bundle: str, level: int) -> None:
    """Log to containerd's ``log`` FIFO in the bundle (its reader is containerd)."""
    try:
        fd = os.open(Path(bundle) / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ENOENT):
            raise
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d husk-shim[%(process)d] %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    # much of what is logged above debug is caused by the guest: keep a flood out
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


async def serve(
    args: ShimArgs,
    listener: socket.socket,
    config: Config | HuskError,
    *,
    booted: BootedVm | None = None,
) -> None:
    """Serve until Shutdown or SIGTERM, then tear everything down.

    ``booted``: the VM the sandbox takes over (a VM pool member serves this way).
    """
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    publisher: Publisher = (
        TtrpcPublisher(ttrpc_address, args.namespace) if ttrpc_address else RecordingPublisher()
    )
    state_root = config.runtime.state_dir if isinstance(config, Config) else None

    make: factory.SandboxFactory
    if isinstance(config, Config):
        make = factory.sandbox_factory(config, args.namespace, booted)
    else:
        error = config

        def make(sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]) -> Sandbox:
            raise error

    model = config.runtime.sandbox_model if isinstance(config, Config) else "pod"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        service = TaskService(
            nursery, make, publisher, sandbox_model=model, namespace=args.namespace
        )
        server = Server()
        for descriptor in TASK_SERVICES:
            server.register(descriptor, service)
        server.register(SANDBOX_SERVICE, SandboxService(nursery, service))
        socket_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        await nursery.start(server.serve_listener, socket_listener)
        if state_root is not None:
            await _start_metrics(nursery, state_root / args.id, service)
        _preboot(service, args, model)
        nursery.start_soon(_on_signals, service)
        await service.shutdown_requested.wait()
        log.info("shutting down")
        await service.teardown()
        await publisher.drain(SHUTDOWN_GRACE)
        await _peers_gone(server, SHUTDOWN_GRACE)
        await server.shutdown(SHUTDOWN_GRACE)
        nursery.cancel_scope.cancel()
    if state_root is not None:
        _reclaim_leftovers(state_root / args.id)


async def _peers_gone(server: Server, timeout: float) -> None:
    """Wait (up to ``timeout``) for containerd to close its connections.

    containerd closes them once it has the reply to Shutdown or ShutdownSandbox
    and waits for the close; ending the shim first could cut that reply off
    (seen under load as RemovePodSandbox's "failed to shutdown sandbox: ttrpc:
    closed", which fails the pod's removal).
    """
    with trio.move_on_after(timeout):
        while server.connection_count:
            await trio.sleep(PEER_POLL)


async def _start_metrics(nursery: trio.Nursery, directory: Path, service: TaskService) -> None:
    """Serve the sandbox's metrics; a shim without them still serves containerd."""
    from shim.metrics import server

    path = directory / METRICS_SOCKET

    async def render() -> tuple[bytes, str]:
        from shim.metrics import snapshot

        # prometheus_client takes ~80 ms to import: not on the event loop, not before a scrape
        exposition = await trio.to_thread.run_sync(
            importlib.import_module, "shim.metrics.exposition"
        )
        taken = await snapshot.take(service.sandbox)
        return exposition.render(taken), exposition.CONTENT_TYPE

    try:
        SandboxState.load(directory).record(Resource(SOCKET_FILE, path=str(path)))
        await nursery.start(server.serve, path, render)
    except OSError as e:
        log.warning("no metrics for %s: %s", directory.name, e)


def _preboot(service: TaskService, args: ShimArgs, model: str) -> None:
    """Boot the VM now if the bundle's container owns its sandbox."""
    if not (Path(args.bundle) / "config.json").exists():
        # a pod's bundle under containerd 2's sandbox API has no spec: StartSandbox boots
        log.debug("bundle %s has no spec: the VM boots at StartSandbox", args.bundle)
        return
    try:
        spec = oci.read_bundle_spec(args.bundle)
        place = placement(args.id, spec, model)
        if place.owner:
            service.boot(place.sandbox_id, network.netns_path(spec), spec)
    except HuskError as e:
        log.info("not booting ahead of Create: %s", e)


async def _on_signals(service: TaskService) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: shutting down", signum)
            service.shutdown_requested.set()
            return


def _reclaim_leftovers(directory: Path) -> None:
    """The state dir ``start`` made, when no sandbox ever took it over."""
    if directory.exists():
        for problem in cleanup.reclaim(SandboxState.load(directory)):
            log.warning("%s", problem)


def main(args: ShimArgs, config: Config | HuskError, pool_miss: str = "") -> int:
    """Entry of the serving process (no action on the command line).

    ``pool_miss``: why ``start`` got no VM from the VM pool (logged once).
    """
    setup_logging(args.bundle, log_level(args, config))
    if pool_miss:
        log.info("%s: %s", args.id, pool_miss)
    try:
        listener = socket.socket(fileno=SERVE_FD)
    except OSError as e:
        log.error("no listening socket on fd %d: %s (start the shim with `start`)", SERVE_FD, e)
        return 1
    if isinstance(config, HuskError):
        log.error("%s", config)
    log.info("serving %s in namespace %s", args.id, args.namespace)
    trio.run(serve, args, listener, config)
    return 0
