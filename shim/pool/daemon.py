"""The VM pool daemon: keeps ``[factory] vm_cache_number`` VMs ready and hands each over once.

``husk factory init`` starts it (detached, logging to ``<state_dir>/vm-cache.log``;
``--foreground`` for systemd). It listens at ``vm_cache_endpoint`` (0600) and
runs one member process per VM (:mod:`shim.pool.member`), each in its own
session, over a socketpair. A claim goes to the member that has been ready
longest; once it answers ``claimed`` it is the sandbox's shim and the daemon
forgets it (it only reaps the process when it ends), and boots a replacement.
A claim the pool cannot serve (none ready, another config) is a miss: the
shim's ``start`` then starts the VM itself.

Stopping (``husk factory destroy``, SIGTERM) closes the unclaimed members'
channels, which makes each destroy its VM and state dir; a member that has not
gone within ``STOP_TIMEOUT`` is killed and its state dir reclaimed. Claimed
members are running sandboxes: they are left alone, as they are when the
daemon dies. On start, state dirs of pool VMs whose process is gone (a
daemon and its members killed outright) are reclaimed.

``husk factory status`` asks the endpoint; Prometheus reads
``<endpoint stem>-metrics.sock`` (:mod:`shim.pool.metrics`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import shim
from shim.config import Config, load
from shim.errors import HuskError
from shim.pool.channel import Channel
from shim.pool.member import PREFIX
from shim.pool.protocol import PoolProtocolError
from shim.resources import pss_bytes
from shim.sandbox import cleanup
from shim.sandbox.state import SandboxState, make_private_dir, sandboxes

log = logging.getLogger("husk.pool")

#: how long a member may take to answer a claim
CLAIM_TIMEOUT = 15.0
#: how long stopping waits for unclaimed members to tear down
STOP_TIMEOUT = 30.0
#: the longest wait before booting again after members failed in a row
MAX_BACKOFF = 60.0
#: refill times kept for the mean
REFILLS_KEPT = 20
#: ``husk factory init`` keeps the daemon's log here, in ``[runtime] state_dir``
LOG_NAME = "vm-cache.log"


def metrics_path(endpoint: Path) -> Path:
    """Where the daemon serves Prometheus metrics, beside its endpoint."""
    return endpoint.with_name(f"{endpoint.stem}-metrics.sock")


@dataclass
class Member:
    """A member process as the daemon sees it."""

    id: str
    process: trio.Process
    channel: Channel
    spawned: float
    ready_at: float | None = None
    vmm_pid: int | None = None
    cloned: bool = False
    #: a claim is being handed to it
    busy: bool = False
    answered: trio.Event = field(default_factory=trio.Event)
    answer: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and not self.busy


Spawn = Callable[[Config, str], Awaitable[tuple[trio.Process, Channel]]]


def child_env() -> dict[str, str]:
    """This environment, with husk's packages importable by ``python -m`` wherever it runs."""
    env = dict(os.environ)
    package_root = str(Path(shim.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


async def spawn_member(config: Config, member_id: str) -> tuple[trio.Process, Channel]:
    """Start ``python -m shim.pool.member`` with one end of a socketpair."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = child_env()
    try:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "shim.pool.member",
                str(config.source),
                member_id,
                str(child.fileno()),
            ],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return process, Channel(trio.SocketStream(trio.socket.from_stdlib_socket(parent)))


class PoolDaemon:
    """The pool: its members, the endpoint, the figures."""

    def __init__(self, config: Config, spawn: Spawn = spawn_member) -> None:
        self.config = config
        self.size = config.factory.vm_cache_number
        self.endpoint = config.factory.vm_cache_endpoint
        self._spawn = spawn
        self.members: dict[str, Member] = {}
        self.hits = 0
        self.misses = 0
        self.failures = 0
        #: seconds from starting a member to its VM being ready, latest last
        self.refills: deque[float] = deque(maxlen=REFILLS_KEPT)
        self._backoff = 0.0
        self._changed = trio.Event()
        self._stop = trio.Event()
        self._reapers: trio.Nursery | None = None

    # -- life -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop`` (or SIGTERM), then take the unclaimed VMs down."""
        from shim.metrics import server
        from shim.pool import metrics

        await trio.to_thread.run_sync(self._reclaim_stale)
        listener = self._bind()
        try:
            async with trio.open_nursery() as reapers:
                self._reapers = reapers
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        trio.serve_listeners,
                        self._handle,
                        [trio.SocketListener(trio.socket.from_stdlib_socket(listener))],
                    )

                    async def render() -> tuple[bytes, str]:
                        return metrics.render(self.status()), metrics.CONTENT_TYPE

                    try:
                        await nursery.start(server.serve, metrics_path(self.endpoint), render)
                    except OSError as e:
                        log.warning("no pool metrics: %s", e)
                    nursery.start_soon(self._fill, nursery)
                    nursery.start_soon(self._on_signals)
                    log.info(
                        "VM pool serving at %s: %d VMs (%s)",
                        self.endpoint,
                        self.size,
                        "template clones" if self.config.factory.enable_template else "cold boots",
                    )
                    task_status.started()
                    await self._stop.wait()
                    log.info("stopping: %d unclaimed VMs go", len(self.members))
                    self.endpoint.unlink(missing_ok=True)
                    with trio.CancelScope(shield=True):
                        await self._drain()
                    nursery.cancel_scope.cancel()
                # claimed members serve sandboxes: they outlive the daemon
                reapers.cancel_scope.cancel()
        finally:
            listener.close()
            self.endpoint.unlink(missing_ok=True)

    def stop(self) -> None:
        """Ask ``run`` to end."""
        self._stop.set()

    def _bind(self) -> socket.socket:
        from shim.pool import protocol

        try:
            protocol.request(self.endpoint, {"op": "status"}, 2.0)
        except (OSError, HuskError):
            pass
        else:
            raise HuskError(f"a VM pool already serves at {self.endpoint}")
        make_private_dir(self.endpoint.parent)
        self.endpoint.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.endpoint))
        except OSError as e:
            listener.close()
            raise HuskError(f"[factory] vm_cache_endpoint {self.endpoint}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        listener.listen(64)
        return listener

    def _reclaim_stale(self) -> None:
        """Pool VMs left by a daemon that was killed with its members."""
        for state in sandboxes(self.config.runtime.state_dir):
            if state.dir.name.startswith(PREFIX) and not state.shim_alive():
                log.info("reclaiming %s, left by an earlier pool", state.dir)
                for problem in cleanup.reclaim(state):
                    log.warning("%s", problem)

    async def _on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d", signum)
                self.stop()
                return

    # -- members ----------------------------------------------------------------

    async def _fill(self, nursery: trio.Nursery) -> None:
        """Keep ``size`` members, booting one at a time; after failures, wait longer each time.

        One at a time keeps the refill in the background: the VMs just handed
        over are starting their pods' containers on the same CPUs (members
        also run niced until a claim, see :mod:`shim.pool.member`).
        """
        while not self._stop.is_set():
            booting = any(m.ready_at is None for m in self.members.values())
            if len(self.members) < self.size and not booting:
                if self._backoff:
                    await trio.sleep(self._backoff)
                    if self._stop.is_set():
                        return
                member_id = PREFIX + secrets.token_hex(6)
                try:
                    process, channel = await self._spawn(self.config, member_id)
                except OSError as e:
                    log.error("cannot start a pool VM: %s", e)
                    self._failed()
                    continue
                member = Member(member_id, process, channel, trio.current_time())
                self.members[member_id] = member
                nursery.start_soon(self._tend, member)
                continue
            self._changed = trio.Event()
            await self._changed.wait()

    def _failed(self) -> None:
        self.failures += 1
        self._backoff = min(max(1.0, self._backoff * 2), MAX_BACKOFF)

    async def _tend(self, member: Member) -> None:
        """Read a member's messages until it is handed over or gone."""
        handed_over = False
        try:
            while True:
                try:
                    message = await member.channel.receive()
                except PoolProtocolError as e:
                    log.warning("pool VM %s: %s", member.id, e)
                    message = None
                if message is None:
                    break
                event = message.get("event")
                if event == "ready" and member.ready_at is None:
                    member.ready_at = trio.current_time()
                    member.cloned = bool(message.get("cloned"))
                    vmm = message.get("vmm_pid")
                    member.vmm_pid = vmm if isinstance(vmm, int) else None
                    self.refills.append(member.ready_at - member.spawned)
                    self._backoff = 0.0
                    self._changed.set()
                elif event == "failed":
                    log.warning("pool VM %s failed: %s", member.id, message.get("reason"))
                elif event in ("claimed", "refused") and member.busy:
                    member.answer = message
                    member.answered.set()
                    if event == "claimed":
                        handed_over = True
                        break
        finally:
            if member.ready_at is None and not handed_over:
                self._failed()
            self._forget(member)
            member.answered.set()
            if self._reapers is not None:
                self._reapers.start_soon(member.process.wait)

    def _forget(self, member: Member) -> None:
        if self.members.pop(member.id, None) is not None:
            self._changed.set()

    async def _drain(self) -> None:
        """Close every unclaimed member's channel; kill those that do not go in time."""
        members = list(self.members.values())
        self.members.clear()
        for member in members:
            await member.channel.aclose()
        with trio.move_on_after(STOP_TIMEOUT):
            for member in members:
                await member.process.wait()
        for member in members:
            if member.process.returncode is None:
                log.warning("pool VM %s did not stop; killing it", member.id)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(member.process.pid, signal.SIGKILL)
                await member.process.wait()
                state = SandboxState.load(self.config.runtime.state_dir / member.id)
                for problem in await trio.to_thread.run_sync(cleanup.reclaim, state):
                    log.warning("%s", problem)

    # -- requests ---------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        channel = Channel(stream)
        async with stream:
            try:
                request = await channel.receive()
            except PoolProtocolError as e:
                await channel.send({"ok": False, "reason": str(e)})
                return
            if request is None:
                return
            op = request.get("op")
            if op == "claim":
                answer = await self.claim(request)
            elif op == "status":
                answer = {"ok": True, **self.status()}
            elif op == "stop":
                self.stop()
                answer = {"ok": True}
            else:
                answer = {"ok": False, "reason": f"unknown op {str(op)[:40]!r}"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await channel.send(answer)

    async def claim(self, request: dict[str, Any]) -> dict[str, Any]:
        """Hand the longest-ready VM to the sandbox ``request`` names."""
        if request.get("config") != str(self.config.source):
            self.misses += 1
            return {
                "ok": False,
                "reason": f"it serves {self.config.source}, not {str(request.get('config'))[:200]}",
            }
        ready = sorted(
            (m for m in self.members.values() if m.ready), key=lambda m: m.ready_at or 0.0
        )
        if not ready:
            self.misses += 1
            booting = sum(1 for m in self.members.values() if m.ready_at is None)
            reason = f"none of its {self.size} VMs is ready ({booting} booting)"
            return {"ok": False, "reason": reason}
        member = ready[0]
        member.busy = True
        try:
            await member.channel.send(request)
            with trio.move_on_after(CLAIM_TIMEOUT):
                await member.answered.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        answer = member.answer or {}
        if answer.get("event") == "claimed":
            self.hits += 1
            log.info("pool VM %s handed to sandbox %s", member.id, request.get("id"))
            return {"ok": True, "socket": answer.get("socket")}
        self.misses += 1
        reason = str(answer.get("reason") or "it did not answer")
        log.warning("pool VM %s not handed to %s: %s", member.id, request.get("id"), reason)
        self._forget(member)
        await member.channel.aclose()
        return {"ok": False, "reason": f"its VM {member.id} refused: {reason}"}

    def status(self) -> dict[str, Any]:
        """The figures ``husk factory status`` and the metrics show."""
        ready = [m for m in self.members.values() if m.ready]
        pids = [pid for m in ready for pid in (m.process.pid, m.vmm_pid) if pid]
        refills = list(self.refills)
        return {
            "endpoint": str(self.endpoint),
            "size": self.size,
            "ready": len(ready),
            "booting": sum(1 for m in self.members.values() if m.ready_at is None),
            "hits": self.hits,
            "misses": self.misses,
            "failures": self.failures,
            "idle_memory_bytes": sum(pss_bytes(pid) for pid in pids),
            "refill_seconds_last": refills[-1] if refills else 0.0,
            "refill_seconds_mean": sum(refills) / len(refills) if refills else 0.0,
            "members": [
                {
                    "id": m.id,
                    "pid": m.process.pid,
                    "vmm_pid": m.vmm_pid,
                    "state": "ready" if m.ready else ("claiming" if m.busy else "booting"),
                    "cloned": m.cloned,
                }
                for m in self.members.values()
            ],
        }


def setup_logging(program: str = "husk-pool") -> None:
    """Lines on stderr (the journal, or the log ``husk factory init`` keeps)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d {program}[%(process)d] %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: list[str]) -> int:
    """``<config path>``: run the daemon in the foreground."""
    setup_logging()
    config = load(Path(argv[0]))
    if config.factory.vm_cache_number <= 0:
        log.error("%s: [factory] vm_cache_number is 0: no pool to keep", config.source)
        return 1
    from shim import registry

    plugin = registry.lookup(config.runtime.hypervisor)
    if not plugin.create(config.hypervisor).capabilities().relocate:
        log.error(
            "%s: [factory] vm_cache_number: the %s plugin cannot hand a running VM over "
            "to a sandbox (no relocate)",
            config.source,
            plugin.name,
        )
        return 1
    try:
        trio.run(PoolDaemon(config).run)
    except HuskError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
