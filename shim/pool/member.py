"""One VM of the pool: booted and exercised ahead of time, then its claimant's shim.

The daemon (:mod:`shim.pool.daemon`) runs ``python -m shim.pool.member
<config> <member id> <channel fd>``. The member boots its VM into
``<state_dir>/<member id>`` as a sandbox would (a clone of the template when
``enable_template`` is on, else cold, within the host's boot slots), makes a
clone unique at once, runs the exercise (:mod:`shim.pool.exercise`) and says
``ready``. Then it waits.

A claim names a sandbox. The member renames its state dir to the sandbox's
(``renameat2(RENAME_NOREPLACE)``: never over another sandbox's), tells the
plugin and the console log where their files are now, binds the shim's socket
there, answers ``claimed`` and becomes that sandbox's serving shim
(:func:`shim.containerd.serve.serve`), with the VM it booted: the VMM keeps its
parent, its QMP and agent connections and its guest CID, so nothing of the
VM is passed between processes. The sandbox then makes the VM unique, grows
it to its size, and hot-plugs its NICs as for a template clone.

A member whose channel closes before a claim (the daemon stopped or died), or
that gets SIGTERM, destroys its VM and reclaims its state dir; one killed
outright leaves a state dir whose shim is dead, which ``husk cleanup``
reclaims like any other.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import trio

from shim import identifiers, registry
from shim.agent.client import AgentClient, wait_ready
from shim.agent.transport import endpoint_record
from shim.config import Config, load
from shim.containerd.launch import ShimArgs
from shim.errors import HuskError
from shim.host import HostFacts
from shim.hypervisor import UNIX_PATH_MAX, Hypervisor, VmSpec
from shim.pool.channel import Channel
from shim.resources import SOCKET_FILE, Resource
from shim.sandbox import cleanup, factory, liveness, rootfs, share
from shim.sandbox.boot import BootedVm, VmLauncher
from shim.sandbox.console import ConsoleLog
from shim.sandbox.devices import DeviceManager
from shim.sandbox.sandbox import AGENT_POWEROFF_TIMEOUT, make_unique
from shim.sandbox.state import BOOTING, POOLED, SHARED, SOCKET, SandboxState
from ttrpc import RpcError

log = logging.getLogger("husk.pool.member")

#: the state dir name of a pool VM not yet claimed: ``pool-<hex>``
PREFIX = "pool-"
#: modules the serving shim imports only when a sandbox needs them (~0.1 s)
_PRELOAD = ("shim.network.lifecycle", "shim.network.tcfilter")
#: the nice value of a member and its VMM until a claim: refills yield the CPUs
#: to the sandboxes starting on them
NICE = 10
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def rename_noreplace(old: Path, new: Path) -> None:
    """Rename ``old`` to ``new``; FileExistsError if ``new`` exists (never replaced)."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), _RENAME_NOREPLACE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


def relocate_state(state: SandboxState, sandbox_id: str, namespace: str) -> Path:
    """Rename the state dir to ``<state_dir>/<sandbox_id>`` and rewrite its record.

    Returns the old dir.
    """
    identifiers.validate("sandbox", sandbox_id)
    old = state.dir
    new = old.parent / sandbox_id
    rename_noreplace(old, new)
    state.dir, state.id, state.namespace = new, sandbox_id, namespace
    state.status = BOOTING
    state.resources = [_moved(r, old, new) for r in state.resources]
    if "path" in state.debug_console:
        state.debug_console["path"] = _moved_path(state.debug_console["path"], old, new)
    state.save()
    return old


def relocated_spec(spec: VmSpec, sandbox_id: str, directory: Path) -> VmSpec:
    """``spec`` with the sandbox's id, and its state dir and share under ``directory``."""
    shared = spec.shared_fs
    return dataclasses.replace(
        spec,
        sandbox_id=sandbox_id,
        state_dir=directory,
        shared_fs=dataclasses.replace(shared, path=directory / SHARED) if shared else None,
    )


def _moved_path(path: str, old: Path, new: Path) -> str:
    p = Path(path)
    return str(new / p.relative_to(old)) if p.is_relative_to(old) else path


def _moved(resource: Resource, old: Path, new: Path) -> Resource:
    if not resource.path:
        return resource
    return dataclasses.replace(resource, path=_moved_path(resource.path, old, new))


class Member:
    """One pool VM, from boot to the hand-over (or its teardown)."""

    def __init__(self, config: Config, member_id: str, channel: Channel) -> None:
        self.config = config
        self.id = member_id
        self.channel = channel
        plugin = registry.lookup(config.runtime.hypervisor)
        self.hypervisor: Hypervisor = plugin.create(config.hypervisor)
        if not self.hypervisor.capabilities().relocate:
            raise HuskError(
                f"[factory] vm_cache_number: the {plugin.name} plugin cannot hand a running "
                "VM over to a sandbox (no relocate)"
            )
        from shim.pool.exercise import BUSYBOX_NAME

        self.busybox = config.runtime.image_dir / BUSYBOX_NAME
        if not self.busybox.exists():
            raise HuskError(
                f"the guest image in {config.runtime.image_dir} has no {BUSYBOX_NAME}, which "
                "a pool VM's exercise runs: rebuild it with `husk image build`"
            )
        problems = plugin.unmet_requirements(config.hypervisor, HostFacts.probe())
        if problems:
            raise HuskError(f"cannot start a pool VM: {'; '.join(problems)}")
        # the checks are done: from here on the state dir records what to reclaim
        self.state = SandboxState.create(config.runtime.state_dir, member_id)
        self.state.claim(os.getpid())
        self.spec = factory.vm_spec(config, self.state)
        self.state.describe_vm(plugin.name, self.spec.vcpus, self.spec.memory_mib)
        self.console = ConsoleLog(self.state.dir / "console.log")
        self.launcher = VmLauncher(
            member_id,
            self.hypervisor,
            self.spec,
            self.console,
            boot_timeout=float(config.hypervisor["boot_timeout"]),
            slots=factory.boot_slots(config),
            template=factory.vm_template(config) if config.factory.enable_template else None,
        )
        #: set once a sandbox's shim serves with the VM (it tears the VM down then)
        self.handed_over = False

    async def run(self) -> None:
        """Boot, exercise, offer; serve the claimant or tear down."""
        started = trio.current_time()
        try:
            async with trio.open_nursery() as vm_tasks:
                try:
                    await self._boot_and_offer(vm_tasks, started)
                finally:
                    self.launcher.release_slot()
                    vm_tasks.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown()

    async def _boot_and_offer(self, vm_tasks: trio.Nursery, started: float) -> None:
        if self.spec.shared_fs is not None:
            await trio.to_thread.run_sync(share.prepare, self.state)
        await self.launcher.start(vm_tasks)
        agent_section = self.config.agent
        async with wait_ready(
            self.hypervisor.agent_endpoint(),
            agent_section.dial_timeout,
            request_timeout=agent_section.request_timeout,
        ) as agent:
            self.launcher.release_slot()
            if self.launcher.cloned:
                # before anything runs in it: a clone's RNG is its template's
                await make_unique(agent)
            booted = trio.current_time()
            await self._exercise(agent)
            # what a sandbox imports on its way up (netlink for its netns): not at the claim
            for module in _PRELOAD:
                importlib.import_module(module)
            ready_at = trio.current_time()
            log.info(
                "pool VM %s: %s in %.2f s, exercised in %.2f s",
                self.id,
                "cloned" if self.launcher.cloned else "booted",
                booted - started,
                ready_at - booted,
            )
            self.state.set_status(POOLED)
            await self.channel.send(
                {
                    "event": "ready",
                    "pid": os.getpid(),
                    "vmm_pid": self.hypervisor.vmm_pid(),
                    "seconds": ready_at - started,
                    "cloned": self.launcher.cloned,
                }
            )
            claim = await self._wait_for_claim()
            if claim is None:
                log.info("pool VM %s: the pool closed; tearing down", self.id)
                with trio.move_on_after(AGENT_POWEROFF_TIMEOUT):
                    try:
                        # the guest powers itself off: the VMM's stop need not escalate
                        await agent.destroy_sandbox()
                    except (RpcError, HuskError) as e:
                        log.debug("pool VM %s: DestroySandbox: %s", self.id, e)
                return
            await self._serve(claim, agent, ready_at)

    async def _exercise(self, agent: AgentClient) -> None:
        from shim.pool import exercise

        devices = DeviceManager(self.state.id, self.hypervisor)
        share_storage = rootfs.shared_storage(self.spec.shared_fs)
        await exercise.run(agent, self.state, devices, share_storage, self.busybox)

    async def _wait_for_claim(self) -> dict[str, Any] | None:
        """The claim, or None when the channel closes, SIGTERM comes or the VM dies first."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                got: list[dict[str, Any] | None] = [None]

                def lost(reason: str) -> None:
                    log.warning("pool VM %s: %s", self.id, reason)
                    nursery.cancel_scope.cancel()

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("pool VM %s: signal %d", self.id, signum)
                        nursery.cancel_scope.cancel()
                        return

                async def on_message() -> None:
                    got[0] = await self.channel.receive()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signal)
                nursery.start_soon(on_message)
                nursery.start_soon(liveness.watch_vm, self.hypervisor, lost)
        return got[0]

    async def _serve(self, claim: dict[str, Any], agent: AgentClient, ready_at: float) -> None:
        from shim.containerd import serve

        try:
            args = _shim_args(claim)
            listener = self._hand_over(args)
        except (HuskError, OSError, ValueError) as e:
            log.warning("pool VM %s: claim refused: %s", self.id, e)
            await self.channel.send({"event": "refused", "reason": str(e)})
            return
        _full_priority(self.hypervisor.vmm_pid())
        await self.channel.send({"event": "claimed", "socket": str(self.state.socket)})
        await self.channel.aclose()
        self.handed_over = True
        ttrpc_address = str(claim.get("ttrpc_address") or "")
        if ttrpc_address:
            os.environ["TTRPC_ADDRESS"] = ttrpc_address
        os.chdir(args.bundle)
        logging.getLogger().handlers.clear()
        serve.setup_logging(args.bundle, serve.log_level(args, self.config))
        log.info("serving %s in namespace %s (pool VM %s)", args.id, args.namespace, self.id)
        booted = BootedVm(
            name=self.id,
            hypervisor=self.hypervisor,
            spec=self.spec,
            console=self.console,
            agent=agent,
            state=self.state,
            cloned=self.launcher.cloned,
            ready_at=ready_at,
        )
        await serve.serve(args, listener, self.config, booted=booted)

    def _hand_over(self, args: ShimArgs) -> socket.socket:
        """Make the VM's state dir the sandbox's and bind its shim socket there.

        What can refuse the sandbox is checked before anything moves (the
        plugin checks its paths at the new place, the socket path its length),
        so a refused claim leaves the pool VM where it was, for its teardown.
        """
        directory = self.state.dir.parent / args.id
        if len(os.fsencode(directory / SOCKET)) > UNIX_PATH_MAX:
            raise ValueError(f"the shim socket {directory / SOCKET} would be too long a path")
        spec = relocated_spec(self.spec, args.id, directory)
        self.hypervisor.relocate(spec)
        try:
            relocate_state(self.state, args.id, args.namespace)
        except OSError:
            self.hypervisor.relocate(self.spec)
            raise
        self.spec = spec
        self.console.relocate(self.state.dir / "console.log")
        self.state.set_debug_console(endpoint_record(self.hypervisor.debug_console_endpoint()))
        path = self.state.socket
        self.state.record(Resource(kind=SOCKET_FILE, path=str(path)))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        return listener

    async def _teardown(self) -> None:
        """The VM and the state dir, unless the sandbox's shim already tore them down."""
        try:
            await self.hypervisor.destroy()
        except HuskError as e:
            log.warning("pool VM %s: destroying the VM: %s", self.id, e)
        if self.state.dir.exists():
            for problem in await trio.to_thread.run_sync(cleanup.reclaim, self.state):
                log.warning("%s", problem)


def _full_priority(vmm_pid: int | None) -> None:
    """Take this process and the VMM (every thread of their groups) back to nice 0."""
    groups = [0] + ([vmm_pid] if vmm_pid else [])
    for group in groups:
        try:
            # the member and QEMU each lead a session: their group is all their threads
            os.setpriority(os.PRIO_PGRP, group, 0)
        except OSError as e:
            log.warning("cannot restore the priority of process group %s: %s", group, e)


def _shim_args(claim: dict[str, Any]) -> ShimArgs:
    bundle = str(claim.get("bundle") or "")
    if not os.path.isabs(bundle) or not os.path.isdir(bundle):
        raise ValueError(f"bundle {bundle!r} is not a directory")
    return ShimArgs(
        namespace=str(claim.get("namespace") or "default"),
        address=str(claim.get("address") or ""),
        publish_binary=str(claim.get("publish_binary") or ""),
        id=identifiers.validate("sandbox", str(claim.get("id") or "")),
        bundle=bundle,
        debug=bool(claim.get("debug")),
    )


async def _main(config: Config, member_id: str, fd: int) -> None:
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    channel = Channel(trio.SocketStream(sock))
    try:
        member = Member(config, member_id, channel)
    except HuskError as e:
        log.error("pool VM %s: %s", member_id, e)
        await channel.send({"event": "failed", "reason": str(e)})
        return
    try:
        await member.run()
    except Exception as e:
        log.error("pool VM %s failed: %s", member_id, str(e).splitlines()[0] if str(e) else e)
        log.debug("pool VM %s", member_id, exc_info=True)
        if not member.handed_over:
            gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
            with trio.move_on_after(1), contextlib.suppress(*gone):
                await channel.send({"event": "failed", "reason": str(e)})


def main(argv: list[str]) -> int:
    """``<config path> <member id> <channel fd>``."""
    config_path, member_id, fd = argv
    from shim.pool.daemon import setup_logging

    os.nice(NICE)  # before any thread or child: they inherit it
    setup_logging("husk-pool-vm")  # until a claim: the daemon's log keeps stderr
    trio.run(_main, load(Path(config_path)), member_id, int(fd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
