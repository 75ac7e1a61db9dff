"""A sandbox: one VM, its guest agent, and the containers running in it.

``Sandbox.run`` owns the sandbox's whole life in one task of the shim's
nursery: it plumbs the pod network's taps (:class:`SandboxNetwork`), boots the
VM through the injected :class:`Hypervisor`, connects to the agent, calls
``CreateSandbox``, hot-adds the pod's NICs and configures them in the guest,
then hosts the background work of its containers (exit waiters, stdio pumps)
in its own nursery until ``stop()``; on the way out it destroys the VM,
removes the taps and reclaims every recorded host resource.
The task service awaits ``ready()`` before using it; a boot failure is raised
there, once, as the one-line error it is.

The VM is sized by its containers' limits (:mod:`shim.sandbox.sizing`): it
boots with room for the container that starts it, grows before each new
container or ``Update`` needs more, and gives memory back when a container
goes (:class:`Resizer`). If the VM dies or its agent stops answering, every
task of the sandbox exits at once (see ``_lose``) and the sandbox tears down.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from agent_proto import agent_pb2, mount_pb2, oci_pb2
from shim.agent.client import AgentClient, wait_ready
from shim.agent.transport import connect, endpoint_record
from shim.containerd.stdio import StdioPaths, StdioPump
from shim.errors import FailedPreconditionError, HuskError, NotFoundError
from shim.hypervisor import AgentEndpoint, Hypervisor, VmSize, VmSpec
from shim.sandbox import cleanup, liveness, oci, rootfs, share, sizing
from shim.sandbox.boot import BootedVm, VmLauncher
from shim.sandbox.boot_slots import BootSlots
from shim.sandbox.console import ConsoleLog
from shim.sandbox.container import KILLED_STATUS, Container, Process, Status, now
from shim.sandbox.devices import DeviceManager
from shim.sandbox.pod_network import SandboxNetwork
from shim.sandbox.resize import Resizer
from shim.sandbox.state import RUNNING, STOPPING, SandboxState
from shim.sandbox.template import VmTemplate
from ttrpc import Code, ConnectionClosed, RpcError

log = logging.getLogger("husk.sandbox")

Dial = Callable[[AgentEndpoint, float], Awaitable[trio.abc.Stream]]
ExitCallback = Callable[[Process], None]
OomCallback = Callable[[str], None]

DESTROY_TIMEOUT = 15.0
#: how long the guest gets to stop its containers and power off by itself
AGENT_POWEROFF_TIMEOUT = 5.0
#: how long an exited process's output may still drain before Wait returns
IO_DRAIN_TIMEOUT = 10.0
#: one TaskOOM per container per this many seconds, however often the guest says so
OOM_REPORT_INTERVAL = 1.0
#: seconds between two GetOOMEvent calls (a real OOM kill is rare)
OOM_PACE = 0.1
#: seconds between two Health.Check calls that prove the agent still answers
LIVENESS_INTERVAL = 10.0
#: host randomness a clone's RNG is reseeded with
RESEED_BYTES = 64
#: where the pod's files (``pod_files``) are kept in the sandbox's state dir
POD_FILES = "pod-files"


class Sandbox:
    """One sandbox VM and its containers."""

    def __init__(
        self,
        state: SandboxState,
        hypervisor: Hypervisor,
        vm_spec: VmSpec,
        *,
        boot_timeout: float,
        dial_timeout: float,
        request_timeout: float,
        network: SandboxNetwork | None = None,
        dial: Dial = connect,
        liveness_interval: float = LIVENESS_INTERVAL,
        slots: BootSlots | None = None,
        template: VmTemplate | None = None,
        booted: BootedVm | None = None,
    ) -> None:
        self.id = state.id
        self.state = state
        self.hypervisor = hypervisor
        #: what is hot-added to the VM (disks, NICs), checked against its capabilities
        self.devices = DeviceManager(state.id, hypervisor)
        #: the guest console, bounded (the guest may write it without end)
        self.console = booted.console if booted else ConsoleLog(state.dir / "console.log")
        #: a VM booted before the sandbox existed (the VM pool's), which it takes over
        self.booted = booted
        self.vm_spec = vm_spec
        #: starts the VM: a clone of the template if there is one, within a boot slot
        self.launcher = VmLauncher(
            state.id,
            hypervisor,
            vm_spec,
            self.console,
            boot_timeout=boot_timeout,
            slots=slots,
            template=template,
            dial=dial,
        )
        self.boot_timeout = boot_timeout
        self.dial_timeout = dial_timeout
        self.request_timeout = request_timeout
        #: the pod network; without one the guest has only loopback
        self.network = network if network is not None else SandboxNetwork(None, state)
        self._dial = dial
        self.containers: dict[str, Container] = {}
        #: the VM's size, from the containers' limits (see ``reserve_boot``)
        self.resizer = Resizer(
            sizing.VmSizing(
                state.id,
                VmSize(vm_spec.vcpus, vm_spec.memory_mib),
                vm_spec.maximum,
                f"[hypervisor.{hypervisor.name}]",
            ),
            hypervisor,
        )
        #: why the VM or its agent was lost (None while both live)
        self.lost: str | None = None
        self.liveness_interval = liveness_interval
        self.on_exit: ExitCallback = lambda process: None
        self.on_oom: OomCallback = lambda container_id: None
        self.boot_seconds = 0.0
        #: the guest's hostname (a pod's own, when the pod started the sandbox itself)
        self.hostname = state.id[:63]
        #: the pod's sysctls when no pause container carries them: they go on the
        #: spec of the sandbox's first container, where the guest sets the pod's
        #: network sysctls on the VM once
        self.pod_sysctls: dict[str, str] = {}
        #: the text of files every container of the pod sees, by their path in the
        #: container, when no pause container's runtime makes them (``/etc/resolv.conf``)
        self.pod_files: dict[str, str] = {}
        #: when the sandbox stopped (None while it has not)
        self.stopped_at: datetime.datetime | None = None
        self._agent: AgentClient | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self._error: BaseException | None = None

    # -- life -------------------------------------------------------------------

    async def run(self) -> None:
        """Boot, serve until ``stop()``, tear down. Never raises a boot error."""
        started = trio.current_time()
        try:
            await self._boot_and_serve(started)
        except Exception as e:
            if self._ready.is_set():
                log.error("sandbox %s failed: %s", self.id, e)
            else:
                log.error("sandbox %s did not start: %s", self.id, e)
            self._error = e
            log.debug("sandbox %s", self.id, exc_info=True)
        finally:
            self._ready.set()
            with trio.CancelScope(shield=True):
                await self._teardown()
            self.stopped_at = now()
            self.stopped.set()

    def reserve_boot(self, container_id: str, limits: VmSize, pod: VmSize) -> None:
        """Before ``run``: size the VM for the container that starts it and its pod's total."""
        self.resizer.sizing.claims[container_id] = limits
        self.resizer.sizing.pod = pod

    async def _boot_and_serve(self, started: float) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            size = self.resizer.sizing.wanted()
            self.resizer.sizing.check(size, f"container {self.id}")
            self.vm_spec = dataclasses.replace(
                self.vm_spec, vcpus=size.vcpus, memory_mib=size.memory_mib
            )
            self.resizer.size = size
            self.launcher.spec = self.vm_spec
            self.resizer.on_resized = self._note_size
            self._note_size(size)
            await self.network.prepare()
            if self.vm_spec.shared_fs is not None and self.booted is None:
                await trio.to_thread.run_sync(share.prepare, self.state)
            # The body's error is carried out of the nursery as itself (not wrapped in
            # an ExceptionGroup), so a failed boot stays the one-line error it is.
            error: Exception | None = None
            async with trio.open_nursery() as vm_tasks:
                try:
                    if self.booted is None:
                        await self.launcher.start(vm_tasks)
                    console_endpoint = self.hypervisor.debug_console_endpoint()
                    self.state.set_debug_console(endpoint_record(console_endpoint))
                    await self._serve(started)
                except Exception as e:
                    error = e
                finally:
                    self.launcher.release_slot()
                vm_tasks.cancel_scope.cancel()
            if error is not None:
                raise error

    def _note_size(self, size: VmSize) -> None:
        self.state.describe_vm(self.hypervisor.name, size.vcpus, size.memory_mib)

    async def _serve(self, started: float) -> None:
        """Connect to the agent (or take the booted VM's), set the sandbox up, serve."""
        if self.booted is not None:
            self.boot_seconds = trio.current_time() - started
            log.info(
                "sandbox %s: took VM %s from the VM pool (%s %.2f s before), ready after %.2f s",
                self.id,
                self.booted.name,
                "cloned" if self.booted.cloned else "booted",
                self.booted.age(),
                self.boot_seconds,
            )
            await self._serve_agent(self.booted.agent, self.booted.spec)
            return
        async with wait_ready(
            self.hypervisor.agent_endpoint(),
            self.dial_timeout,
            request_timeout=self.request_timeout,
            dial=self._dial,
        ) as agent:
            self.launcher.release_slot()
            self.boot_seconds = trio.current_time() - started
            how = "cloned from the VM template" if self.launcher.cloned else "booted"
            log.info("sandbox %s: %s, agent ready after %.2f s", self.id, how, self.boot_seconds)
            await self._serve_agent(
                agent, self.launcher.spec_started if self.launcher.cloned else None
            )

    async def _serve_agent(self, agent: AgentClient, started_as: VmSpec | None) -> None:
        """``started_as``: the spec of a VM not booted for this sandbox (a clone, a pool VM)."""
        steps = [trio.current_time()]
        if started_as is not None:
            await make_unique(agent)
            # it has the size it was started with: grow it to what the sandbox wants
            self.resizer.size = VmSize(started_as.vcpus, started_as.memory_mib)
            await self.resizer.grow(agent)
        steps.append(trio.current_time())
        storage = rootfs.shared_storage(self.vm_spec.shared_fs)
        await agent.create_sandbox(
            agent_pb2.CreateSandboxRequest(
                hostname=self.hostname,
                storages=[storage] if storage is not None else [],
                sandbox_id=self.id,
            )
        )
        steps.append(trio.current_time())
        await self.network.attach(self.devices, agent)
        steps.append(trio.current_time())
        log.debug(
            "sandbox %s: in the guest in %.2f s (unique and sized %.2f, CreateSandbox %.2f, "
            "NICs %.2f)",
            self.id,
            steps[-1] - steps[0],
            *(b - a for a, b in itertools.pairwise(steps)),
        )
        self._agent = agent
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_oom, agent)
            nursery.start_soon(self.network.serve_port_forwards)
            nursery.start_soon(liveness.watch_vm, self.hypervisor, self._lose)
            nursery.start_soon(liveness.watch_agent, agent, self.liveness_interval, self._lose)
            self.state.set_status(RUNNING)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        await self._power_off_guest(agent)

    async def _power_off_guest(self, agent: AgentClient) -> None:
        # The guest ignores ACPI powerdown; DestroySandbox makes it stop its
        # containers and power itself off, so the VMM's stop finds it gone
        # instead of waiting out each of its escalation timeouts.
        self._agent = None
        with trio.move_on_after(AGENT_POWEROFF_TIMEOUT):
            try:
                await agent.destroy_sandbox()
            except (RpcError, HuskError) as e:
                log.debug("sandbox %s: DestroySandbox: %s", self.id, e)

    async def ready(self) -> None:
        """Wait for the boot to finish; raise its error if it failed."""
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        if self._agent is None:
            raise FailedPreconditionError(f"sandbox {self.id} is shutting down")

    def stop(self) -> None:
        """Ask ``run`` to tear the sandbox down (also cancels a boot in progress)."""
        self._stop.set()
        if not self._ready.is_set() and hasattr(self, "_scope"):
            self._scope.cancel()

    async def _teardown(self) -> None:
        self._agent = None
        self.state.set_status(STOPPING)
        for container in list(self.containers.values()):
            self._mark_all_exited(container)
            try:
                await rootfs.detach(container.id, container.shared, self.state, self.devices)
            except HuskError as e:
                log.warning("sandbox %s: %s", self.id, e)
        with trio.move_on_after(DESTROY_TIMEOUT) as scope:
            try:
                await self.hypervisor.destroy()
            except Exception as e:
                log.warning("sandbox %s: destroying the VM: %s", self.id, e)
        if scope.cancelled_caught:
            log.warning("sandbox %s: the VM did not stop in %g s", self.id, DESTROY_TIMEOUT)
        await self.network.teardown()
        problems = await trio.to_thread.run_sync(cleanup.reclaim, self.state)
        for problem in problems:
            log.warning("%s", problem)

    @property
    def running(self) -> bool:
        """Whether the VM is up and its agent serves (booted, not stopping, not lost)."""
        return self._agent is not None

    @property
    def agent(self) -> AgentClient:
        """The connected agent; FailedPrecondition once the sandbox is going away."""
        if self._agent is None:
            raise FailedPreconditionError(f"sandbox {self.id} is not running")
        return self._agent

    @property
    def nursery(self) -> trio.Nursery:
        """Where the containers' background tasks run."""
        if self._nursery is None:
            raise FailedPreconditionError(f"sandbox {self.id} is not running")
        return self._nursery

    # -- containers -------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        """A container of this sandbox; NotFound otherwise."""
        try:
            return self.containers[container_id]
        except KeyError:
            raise NotFoundError(
                f"container {container_id} not found in sandbox {self.id}"
            ) from None

    async def create_container(
        self,
        container_id: str,
        bundle: str,
        spec: dict[str, Any],
        mounts: list[mount_pb2.Mount],
        stdio: StdioPaths,
    ) -> Container:
        """Grow the VM for its limits, share the rootfs, then ``CreateContainer`` in the guest."""
        agent = self.agent
        oci_spec = oci.spec_from_json(spec)
        what = f"container {container_id}"
        limits = sizing.container_limits(oci_spec.Linux.Resources, what)
        previous = await self.resizer.claim(agent, container_id, limits, what)
        try:
            self.state.add_container(container_id)
            shared = await rootfs.attach(
                container_id, bundle, spec, mounts, self.state, self.devices
            )
        except BaseException:
            self._give_back(container_id, previous)
            raise
        try:
            oci_spec.Root.Path = shared.guest_path
            oci_spec.Process.Terminal = stdio.terminal
            oci_spec.ClearField("Hooks")
            if not self.containers:
                _add_pod_sysctls(oci_spec, self.pod_sysctls)
            self._add_pod_files(oci_spec)
            rootfs.share_bind_mounts(container_id, oci_spec, shared, self.state)
            await agent.create_container(
                agent_pb2.CreateContainerRequest(
                    container_id=container_id, storages=shared.storages, OCI=oci_spec
                )
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await rootfs.detach(container_id, shared, self.state, self.devices)
            self.state.remove_container(container_id)
            self._give_back(container_id, previous)
            raise
        init = Process(container_id, "", stdio)
        container = Container(container_id, bundle, mounts, init, shared)
        self.containers[container_id] = container
        return container

    def _add_pod_files(self, spec: oci_pb2.Spec) -> None:
        """Bind the pod's files read-only where the container mounts nothing itself."""
        taken = {m.destination for m in spec.Mounts}
        for destination, text in self.pod_files.items():
            if destination in taken:
                continue
            host = self.state.dir / POD_FILES / destination.strip("/").replace("/", "_")
            if not host.exists():
                host.parent.mkdir(mode=0o700, exist_ok=True)
                host.write_text(text)
            spec.Mounts.append(
                oci_pb2.Mount(
                    destination=destination,
                    source=str(host),
                    type="bind",
                    options=["rbind", "ro"],
                )
            )

    async def start(self, container: Container, process: Process) -> None:
        """Run a created process: the init process, or an exec'd one."""
        if process.status != Status.CREATED:
            raise FailedPreconditionError(f"process {process.label} is not in the created state")
        agent = self.agent
        if process.exec_id:
            assert process.spec is not None
            await agent.exec_process(
                agent_pb2.ExecProcessRequest(
                    container_id=container.id, exec_id=process.exec_id, process=process.spec
                )
            )
        else:
            await agent.start_container(container.id)
        process.status = Status.RUNNING
        self._watch(process)

    def _watch(self, process: Process) -> None:
        """Start the stdio pump and the exit waiter of a process."""
        if process.waiting:
            return
        process.waiting = True
        agent = self.agent
        pump = StdioPump(
            agent, process.container_id, process.exec_id, process.stdio, process.outputs
        )
        process.pump = pump
        self.nursery.start_soon(pump.run)
        self.nursery.start_soon(self._wait, agent, process)

    async def _wait(self, agent: AgentClient, process: Process) -> None:
        try:
            status = await agent.wait_process(process.container_id, process.exec_id)
        except ConnectionClosed as e:
            log.warning("%s: lost the agent (%s); reporting it killed", process.label, e)
            status = KILLED_STATUS
        except RpcError as e:
            log.warning("%s: WaitProcess: %s", process.label, e)
            status = KILLED_STATUS
        if process.pump is not None:
            with trio.move_on_after(IO_DRAIN_TIMEOUT):
                await process.pump.output_done.wait()
        self._exited(process, status)

    def _exited(self, process: Process, status: int) -> None:
        if process.exited.is_set():
            return
        process.set_exited(status)
        log.info("%s exited with status %d", process.label, status)
        self.on_exit(process)

    def _mark_all_exited(self, container: Container) -> None:
        for process in container.processes():
            if process.status != Status.CREATED or process.waiting:
                self._exited(process, KILLED_STATUS)

    async def kill(self, process: Process, signal: int, all_processes: bool) -> None:
        """Signal a process (or, with ``all_processes``, the whole container)."""
        if process.exited.is_set():
            raise NotFoundError(f"process {process.label} already finished")
        exec_id = "" if all_processes else process.exec_id
        await self.agent.signal_process(process.container_id, exec_id, signal)
        # a created, never started process exits too: wait for it to report that
        self._watch(process)

    async def delete_exec(self, container: Container, process: Process) -> None:
        """Forget an exec'd process that has exited (or never started)."""
        if process.status in (Status.RUNNING, Status.PAUSED):
            raise FailedPreconditionError(f"process {process.label} is still running")
        container.execs.pop(process.exec_id, None)

    async def delete_container(self, container: Container) -> None:
        """``RemoveContainer`` in the guest, then undo the rootfs share."""
        init = container.init
        if init.status in (Status.RUNNING, Status.PAUSED):
            raise FailedPreconditionError(f"container {container.id} is still running")
        if self.lost is not None or self._stop.is_set():
            # the VM is gone: teardown detaches every share and reclaims the state dir
            await self.stopped.wait()
            self.containers.pop(container.id, None)
            return
        try:
            await self.agent.remove_container(container.id)
        except (RpcError, ConnectionClosed) as e:
            if getattr(e, "code", None) not in (Code.NOT_FOUND, Code.UNAVAILABLE):
                raise
            log.info("container %s: RemoveContainer: %s", container.id, e)
        except FailedPreconditionError:
            pass  # the sandbox is going away: teardown reclaims the share
        if not init.exited.is_set():
            init.set_exited(KILLED_STATUS)
        await rootfs.detach(container.id, container.shared, self.state, self.devices)
        self.containers.pop(container.id, None)
        self.state.remove_container(container.id)
        self._give_back(container.id, None)

    async def update_container(
        self, container: Container, resources: oci_pb2.LinuxResources
    ) -> None:
        """New limits: grow the VM first if they need it, then ``UpdateContainer`` in the guest.

        A lower limit gives memory back afterwards; a failed update restores the
        container's claim (vCPUs hot-added for it stay where they cannot be unplugged).
        """
        agent = self.agent
        what = f"update of container {container.id}"
        current = self.resizer.sizing.claims.get(container.id, sizing.NOTHING)
        limits = sizing.updated_limits(current, resources, what)
        previous = await self.resizer.claim(agent, container.id, limits, what)
        try:
            await agent.update_container(
                agent_pb2.UpdateContainerRequest(container_id=container.id, resources=resources)
            )
        except BaseException:
            self._give_back(container.id, previous)
            raise
        self._give_back(None, None)

    def _give_back(self, container_id: str | None, previous: VmSize | None) -> None:
        """Put ``container_id``'s claim back to ``previous`` and shrink the VM in the background."""
        if container_id is not None:
            self.resizer.restore(container_id, previous)
        if self._nursery is not None and self._agent is not None:
            self._nursery.start_soon(self.resizer.fit, self._agent)

    # -- the VM and its agent dying --------------------------------------------

    def _lose(self, reason: str) -> None:
        """The VM or its agent is gone: every task of the sandbox exits, then the sandbox stops.

        Each process that ran gets exit status 137 (128 + SIGKILL), as a process
        killed with its machine: it did not exit by itself, and the kernel that
        ran it is gone, so nothing better is known. containerd gets TaskExit for
        each at once, ``ctr task ls`` shows them STOPPED, and Delete only forgets
        them, because the teardown that follows reclaims every host resource.
        """
        if self.lost is not None or self._stop.is_set():
            return
        self.lost = reason
        log.error("sandbox %s: %s; its tasks exit with status %d", self.id, reason, KILLED_STATUS)
        for container in list(self.containers.values()):
            self._mark_all_exited(container)
        self.stop()

    async def _watch_oom(self, agent: AgentClient) -> None:
        """Pass the guest's OOM events on, as far as they can be true.

        The guest is untrusted: an event naming a container this sandbox does
        not hold is dropped, the same container is reported at most once per
        ``OOM_REPORT_INTERVAL``, and events are taken at most every
        ``OOM_PACE`` seconds, so an agent answering GetOOMEvent in a loop
        costs the shim little CPU and containerd a bounded number of events.
        """
        last_reported: dict[str, float] = {}
        while True:
            try:
                container_id = await agent.get_oom_event()
            except (RpcError, ConnectionClosed) as e:
                log.debug("sandbox %s: no OOM events: %s", self.id, e)
                return
            now = trio.current_time()
            if container_id not in self.containers:
                log.warning(
                    "sandbox %s: the guest reported an OOM kill in %r, which is not one of "
                    "its containers; ignored",
                    self.id,
                    container_id[:80],
                )
            elif now - last_reported.get(container_id, -OOM_REPORT_INTERVAL) >= OOM_REPORT_INTERVAL:
                last_reported[container_id] = now
                self.on_oom(container_id)
            await trio.sleep(OOM_PACE)


def _add_pod_sysctls(spec: oci_pb2.Spec, sysctls: dict[str, str]) -> None:
    """The pod's sysctls on its first container's spec, where the container sets none."""
    for key, value in sysctls.items():
        spec.Linux.Sysctl.setdefault(key, value)


async def make_unique(agent: AgentClient) -> None:
    """A clone stops being a copy of its template before anything else runs in it.

    Its RNG restarts from the template's state and its clock from when the
    template was saved: reseed the RNG from the host's (the agent also forces
    the kernel's CRNG to take it at once), then set the clock. The hostname
    comes with CreateSandbox; ``boot_id`` is made on its first read, which
    nothing did in the template, so it comes from the reseeded RNG.
    """
    await agent.reseed_random_dev(os.urandom(RESEED_BYTES))
    now = time.time()
    await agent.set_guest_date_time(int(now), int((now % 1) * 1_000_000))
