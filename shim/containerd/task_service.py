"""containerd's ``containerd.task.v2.Task`` service, served by one shim process.

One shim serves one sandbox: the container it was started for and, under the
CRI's pod annotations, the other containers of that pod. The service maps each
RPC onto the :class:`Sandbox` and publishes the task events containerd expects,
in the order things happen: TaskCreate, TaskStart, TaskExecAdded,
TaskExecStarted, TaskPaused, TaskResumed, TaskExit, TaskDelete (TaskOOM when
the guest reports one). It knows nothing of QEMU: the sandbox's hypervisor is
made by the injected ``make_sandbox``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import trio
from google.protobuf import any_pb2, empty_pb2

from agent_proto import events_pb2, task_pb2, task_types_pb2
from shim import network
from shim.containerd import metrics
from shim.containerd.events import Publisher
from shim.containerd.outputs import OutputsRequest, open_outputs
from shim.containerd.stdio import Outputs, StdioPaths
from shim.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnimplementedError,
)
from shim.hypervisor import VmSize
from shim.sandbox import oci, sizing
from shim.sandbox.annotations import placement
from shim.sandbox.container import Container, Process, Status, timestamp
from shim.sandbox.pod_settings import PodSettings
from shim.sandbox.sandbox import Sandbox

log = logging.getLogger("husk.task")

Empty = empty_pb2.Empty
#: makes the (not yet booted) sandbox with this id on this pod netns (None: loopback
#: only), from the annotations of the container that owns it
SandboxFactory = Callable[[str, str | None, Mapping[str, Any]], Sandbox]


class TaskService:
    """The Task RPCs, named as on the wire."""

    def __init__(
        self,
        nursery: trio.Nursery,
        make_sandbox: SandboxFactory,
        publisher: Publisher,
        *,
        sandbox_model: str = "pod",
        namespace: str = "default",
    ) -> None:
        self._nursery = nursery
        self._make_sandbox = make_sandbox
        self._publisher = publisher
        self._sandbox_model = sandbox_model
        self._namespace = namespace
        self.sandbox: Sandbox | None = None
        self.shutdown_requested = trio.Event()
        #: set when the shim is a pod's sandboxer (containerd 2's sandbox API): then
        #: only ShutdownSandbox (or ``now``) ends it, not the last task's delete
        self.serves_sandbox_api = False
        self._creating: set[str] = set()

    # -- the sandbox ------------------------------------------------------------

    def boot(
        self, sandbox_id: str, netns: str | None = None, spec: dict[str, Any] | None = None
    ) -> Sandbox:
        """Start booting this shim's sandbox (idempotent); returns it.

        ``netns`` is the pod's network namespace and ``spec`` the OCI spec of
        the container that owns the sandbox (its id is the sandbox's): the VM
        boots with room for that container's limits and, under the CRI, its
        pod's declared total. Bad limits fail here, before anything is made.
        """
        if self.sandbox is None:
            what = f"container {sandbox_id}"
            resources = oci.spec_from_json(spec or {}).Linux.Resources
            limits = sizing.container_limits(resources, what)
            annotations = (spec or {}).get("annotations") or {}
            return self._boot(sandbox_id, netns, annotations, limits, what, PodSettings())
        return self._same_sandbox(sandbox_id)

    def boot_pod(self, sandbox_id: str, netns: str | None, pod: PodSettings) -> Sandbox:
        """Start booting the sandbox of a whole pod, with no container of its own (idempotent).

        The VM boots with room for the pod's declared total; its first container
        carries the pod's sysctls to the guest.
        """
        if self.sandbox is None:
            what = f"sandbox {sandbox_id}"
            return self._boot(sandbox_id, netns, pod.annotations, sizing.NOTHING, what, pod)
        return self._same_sandbox(sandbox_id)

    def _boot(
        self,
        sandbox_id: str,
        netns: str | None,
        annotations: Mapping[str, Any],
        limits: VmSize,
        what: str,
        pod: PodSettings,
    ) -> Sandbox:
        reservation = sizing.pod_reservation(annotations, what)
        sandbox = self._make_sandbox(sandbox_id, netns, annotations)
        sandbox.reserve_boot(sandbox_id, limits, reservation)
        if pod.hostname:
            sandbox.hostname = pod.hostname
        sandbox.pod_sysctls = dict(pod.sysctls)
        sandbox.pod_files = dict(pod.files)
        sandbox.on_exit = self._process_exited
        sandbox.on_oom = self._oom
        self.sandbox = sandbox
        self._nursery.start_soon(sandbox.run)
        return sandbox

    def _same_sandbox(self, sandbox_id: str) -> Sandbox:
        assert self.sandbox is not None
        if self.sandbox.id != sandbox_id:
            raise FailedPreconditionError(
                f"this shim serves sandbox {self.sandbox.id}, not {sandbox_id}"
            )
        return self.sandbox

    async def teardown(self) -> None:
        """Stop the loggers, destroy the sandbox (VM and host resources), wait until it is gone."""
        if self.sandbox is not None:
            async with trio.open_nursery() as nursery:
                for container in self.sandbox.containers.values():
                    for process in container.processes():
                        nursery.start_soon(_close_outputs, process)
            self.sandbox.stop()
            await self.sandbox.stopped.wait()

    async def _open_outputs(self, sandbox: Sandbox, process: Process, label: str) -> Outputs:
        """Where the process's stdout and stderr go (a ``binary://`` logger is ready)."""
        return await open_outputs(
            OutputsRequest(
                stdio=process.stdio,
                process_id=process.exec_id or process.container_id,
                namespace=self._namespace,
                label=label,
                record=sandbox.state.record,
                forget=sandbox.state.forget,
            )
        )

    def _container(self, container_id: str) -> Container:
        if self.sandbox is None:
            raise NotFoundError(f"container {container_id} not found")
        return self.sandbox.container(container_id)

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        container = self._container(container_id)
        return container, container.process(exec_id)

    def _running_sandbox(self) -> Sandbox:
        if self.sandbox is None:
            raise FailedPreconditionError("this shim has no sandbox")
        return self.sandbox

    # -- events -----------------------------------------------------------------

    def _process_exited(self, process: Process) -> None:
        self._publisher.publish(
            events_pb2.TaskExit(
                container_id=process.container_id,
                id=process.exec_id or process.container_id,
                pid=process.pid,
                exit_status=process.exit_status,
                exited_at=timestamp(process.exited_at),
            )
        )

    def _oom(self, container_id: str) -> None:
        self._publisher.publish(events_pb2.TaskOOM(container_id=container_id))

    # -- RPCs -------------------------------------------------------------------

    async def Create(
        self, request: task_pb2.CreateTaskRequest, ctx: object
    ) -> task_pb2.CreateTaskResponse:
        """Boot the sandbox if needed, share the rootfs, create the container."""
        cid = request.id
        if request.checkpoint:
            raise UnimplementedError("husk cannot restore containers from a checkpoint")
        sandbox = self.sandbox
        if cid in self._creating or (sandbox is not None and cid in sandbox.containers):
            raise AlreadyExistsError(f"container {cid} already exists")
        self._creating.add(cid)
        try:
            spec = oci.read_bundle_spec(request.bundle)
            place = placement(cid, spec, self._sandbox_model)
            if not place.owner and (sandbox is None or sandbox.id != place.sandbox_id):
                raise FailedPreconditionError(
                    f"container {cid} belongs to sandbox {place.sandbox_id}, "
                    "which this shim does not run"
                )
            netns = network.netns_path(spec) if place.owner else None
            sandbox = self.boot(place.sandbox_id, netns, spec if place.owner else None)
            stdio = StdioPaths(request.stdin, request.stdout, request.stderr, request.terminal)
            # a bad log URI or a failing logger fails Create before the guest sees anything
            init = Process(cid, "", stdio)
            init.outputs = await self._open_outputs(sandbox, init, f"container {cid}")
            try:
                await sandbox.ready()
                container = await sandbox.create_container(
                    cid, request.bundle, spec, list(request.rootfs), stdio
                )
            except BaseException:
                await _close_outputs(init)
                raise
            container.init.outputs = init.outputs
        finally:
            self._creating.discard(cid)
        self._publisher.publish(
            events_pb2.TaskCreate(
                container_id=cid,
                bundle=request.bundle,
                rootfs=request.rootfs,
                io=events_pb2.TaskIO(
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    terminal=request.terminal,
                ),
                pid=container.init.pid,
            )
        )
        return task_pb2.CreateTaskResponse(pid=container.init.pid)

    async def Start(self, request: task_pb2.StartRequest, ctx: object) -> task_pb2.StartResponse:
        """Start the init process or an exec'd one."""
        container, process = self._process(request.id, request.exec_id)
        sandbox = self._running_sandbox()
        if process.exec_id and process.outputs is None:
            # as runc's shim: an exec'd process's IO (and logger) is set up at its start
            label = f"exec {process.exec_id} of container {container.id}"
            process.outputs = await self._open_outputs(sandbox, process, label)
        try:
            await sandbox.start(container, process)
        except BaseException:
            if process.exec_id:
                await _close_outputs(process)
            raise
        if process.exec_id:
            self._publisher.publish(
                events_pb2.TaskExecStarted(
                    container_id=container.id, exec_id=process.exec_id, pid=process.pid
                )
            )
        else:
            self._publisher.publish(
                events_pb2.TaskStart(container_id=container.id, pid=process.pid)
            )
        return task_pb2.StartResponse(pid=process.pid)

    async def State(self, request: task_pb2.StateRequest, ctx: object) -> task_pb2.StateResponse:
        """Status, stdio and exit of a process."""
        container, process = self._process(request.id, request.exec_id)
        return task_pb2.StateResponse(**process.state(container.bundle))

    async def Delete(self, request: task_pb2.DeleteRequest, ctx: object) -> task_pb2.DeleteResponse:
        """Forget an exec'd process, or remove the container from the sandbox."""
        container, process = self._process(request.id, request.exec_id)
        sandbox = self._running_sandbox()
        if process.exec_id:
            await sandbox.delete_exec(container, process)
            await _close_outputs(process)
        else:
            await sandbox.delete_container(container)
            for each in container.processes():
                await _close_outputs(each)
            self._publisher.publish(
                events_pb2.TaskDelete(
                    container_id=container.id,
                    pid=process.pid,
                    exit_status=process.exit_status,
                    exited_at=timestamp(process.exited_at),
                )
            )
        return task_pb2.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at),
        )

    async def Pids(self, request: task_pb2.PidsRequest, ctx: object) -> task_pb2.PidsResponse:
        """The container's processes (each reported with its shim's pid)."""
        container = self._container(request.id)
        infos = [
            task_types_pb2.ProcessInfo(pid=p.pid)
            for p in container.processes()
            if p.status in (Status.RUNNING, Status.PAUSED)
        ]
        return task_pb2.PidsResponse(processes=infos)

    async def Pause(self, request: task_pb2.PauseRequest, ctx: object) -> Empty:
        """Freeze the container in the guest."""
        await self._change_freezer(request.id, Status.RUNNING, Status.PAUSED)
        self._publisher.publish(events_pb2.TaskPaused(container_id=request.id))
        return Empty()

    async def Resume(self, request: task_pb2.ResumeRequest, ctx: object) -> Empty:
        """Thaw the container."""
        await self._change_freezer(request.id, Status.PAUSED, Status.RUNNING)
        self._publisher.publish(events_pb2.TaskResumed(container_id=request.id))
        return Empty()

    async def _change_freezer(self, container_id: str, before: Status, after: Status) -> None:
        """Pause (RUNNING → PAUSED) or resume (PAUSED → RUNNING) every process of a container."""
        container = self._container(container_id)
        if container.init.status != before:
            state = "running" if before == Status.RUNNING else "paused"
            raise FailedPreconditionError(f"container {container.id} is not {state}")
        agent = self._running_sandbox().agent
        if after == Status.PAUSED:
            await agent.pause_container(container.id)
        else:
            await agent.resume_container(container.id)
        for process in container.processes():
            if process.status == before:
                process.status = after

    async def Checkpoint(self, request: task_pb2.CheckpointTaskRequest, ctx: object) -> Empty:
        """Not possible for a VM sandbox."""
        raise UnimplementedError(
            f"husk cannot checkpoint container {request.id}: its processes run inside a VM, "
            "where CRIU does not reach; stop and recreate it instead"
        )

    async def Kill(self, request: task_pb2.KillRequest, ctx: object) -> Empty:
        """Signal a process, or every process of the container with ``all``."""
        _, process = self._process(request.id, request.exec_id)
        await self._running_sandbox().kill(process, request.signal, request.all)
        return Empty()

    async def Exec(self, request: task_pb2.ExecProcessRequest, ctx: object) -> Empty:
        """Register an exec'd process; it runs at Start."""
        container = self._container(request.id)
        if not request.exec_id:
            raise InvalidArgumentError(f"container {container.id}: exec needs an exec id")
        if request.exec_id in container.execs:
            raise AlreadyExistsError(f"container {container.id}: exec {request.exec_id} exists")
        if container.init.status != Status.RUNNING:
            raise FailedPreconditionError(f"container {container.id} is not running")
        spec = oci.process_from_json(_json_any(request.spec, "exec process spec"))
        spec.Terminal = request.terminal
        stdio = StdioPaths(request.stdin, request.stdout, request.stderr, request.terminal)
        container.execs[request.exec_id] = Process(container.id, request.exec_id, stdio, spec)
        self._publisher.publish(
            events_pb2.TaskExecAdded(container_id=container.id, exec_id=request.exec_id)
        )
        return Empty()

    async def ResizePty(self, request: task_pb2.ResizePtyRequest, ctx: object) -> Empty:
        """New terminal size for a process's pty."""
        _, process = self._process(request.id, request.exec_id)
        if process.pump is None:
            raise FailedPreconditionError(f"process {process.label} has not started")
        await process.pump.resize(request.height, request.width)
        return Empty()

    async def CloseIO(self, request: task_pb2.CloseIORequest, ctx: object) -> Empty:
        """Close a process's stdin (the guest process reads EOF)."""
        _, process = self._process(request.id, request.exec_id)
        if request.stdin and process.pump is not None:
            await process.pump.close_stdin()
        return Empty()

    async def Update(self, request: task_pb2.UpdateTaskRequest, ctx: object) -> Empty:
        """New cgroup limits for the container: the VM grows first if they need it."""
        container = self._container(request.id)
        resources = oci.resources_from_json(_json_any(request.resources, "resources"))
        await self._running_sandbox().update_container(container, resources)
        return Empty()

    async def Wait(self, request: task_pb2.WaitRequest, ctx: object) -> task_pb2.WaitResponse:
        """Block until the process exits."""
        _, process = self._process(request.id, request.exec_id)
        await process.exited.wait()
        return task_pb2.WaitResponse(
            exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    async def Stats(self, request: task_pb2.StatsRequest, ctx: object) -> task_pb2.StatsResponse:
        """The container's guest cgroup (v2) figures, as containerd's cgroups v2 ``Metrics``."""
        container = self._container(request.id)
        stats = await self._running_sandbox().agent.stats_container(container.id)
        return task_pb2.StatsResponse(stats=metrics.pack(metrics.from_agent(stats)))

    async def Connect(
        self, request: task_pb2.ConnectRequest, ctx: object
    ) -> task_pb2.ConnectResponse:
        """The shim's pid and the task's."""
        task_pid = 0
        if self.sandbox is not None and request.id in self.sandbox.containers:
            task_pid = self.sandbox.containers[request.id].init.pid
        return task_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid, version="2")

    async def Shutdown(self, request: task_pb2.ShutdownRequest, ctx: object) -> Empty:
        """Exit the shim once no container is left (``now``: regardless).

        containerd 2 asks this after every task's Delete; a shim that is its
        pod's sandboxer lives on until ShutdownSandbox.
        """
        busy = self.sandbox is not None and self.sandbox.containers
        if (busy or self.serves_sandbox_api) and not request.now:
            return Empty()
        self.shutdown_requested.set()
        return Empty()


async def _close_outputs(process: Process) -> None:
    """Close where a process's output went (a logger gets SIGTERM, then is reaped)."""
    outputs, process.outputs = process.outputs, None
    if outputs is not None:
        with trio.CancelScope(shield=True):
            await outputs.aclose()


def _json_any(value: any_pb2.Any, what: str) -> dict[str, Any]:
    """containerd packs runtime-spec pieces as JSON in an ``Any``."""
    try:
        data = json.loads(value.value or b"{}")
    except ValueError as e:
        raise InvalidArgumentError(f"{what} ({value.type_url}) is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{what} ({value.type_url}) is not a JSON object")
    return data
