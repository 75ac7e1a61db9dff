"""containerd 2's ``containerd.runtime.sandbox.v1.Sandbox``: the shim as its runtime's sandboxer.

With ``sandboxer = "shim"`` in a runtime's section, containerd (2.0+) runs
``shim start`` with the pod's id, then asks the serving shim itself for the
pod's sandbox instead of creating a pause container through the task API
(``plugins/sandbox/controller.go``):

- ``CreateSandbox``: the pod's netns path (the CRI made it and ran CNI in it
  on the host, as for a pause container) and its ``PodSandboxConfig``; husk
  records them (:mod:`shim.containerd.pod_config`), nothing boots yet;
- ``StartSandbox``: the VM boots with the pod's network carried in, as the
  pause container's ``Create`` would have booted it; the reply's pid is the
  shim's (containerd's pod pid, as each task reports the shim's);
- the pod's containers then come through the task API on this same shim
  (containerd reuses the sandbox's version-3 bootstrap address for them) and
  run in the VM;
- ``StopSandbox`` stops the VM (its tasks exit 137) and reclaims every host
  resource, ``WaitSandbox`` returns once it is gone, ``ShutdownSandbox`` ends
  the shim; ``SandboxStatus``, ``PingSandbox``, ``Platform`` and
  ``SandboxMetrics`` answer about it.

The VM itself is the task service's one :class:`Sandbox`: this service only
translates the protocol, so the sandbox engine never learns which path, or
which containerd, started it.
"""

from __future__ import annotations

import datetime
import os
import platform

import trio

from agent_proto import cgroups_v2_pb2, sandbox_pb2
from shim.containerd import metrics
from shim.containerd.pod_config import pod_settings
from shim.containerd.task_service import TaskService
from shim.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from shim.sandbox.container import KILLED_STATUS, now, timestamp
from shim.sandbox.pod_settings import PodSettings
from shim.sandbox.sandbox import Sandbox

#: the states the CRI reads from SandboxStatus (runtime.v1.PodSandboxState names)
READY, NOT_READY = "SANDBOX_READY", "SANDBOX_NOTREADY"
#: Go's GOARCH for Python's machine names (containerd's platforms)
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


class SandboxService:
    """The Sandbox RPCs, named as on the wire, over the task service's sandbox."""

    def __init__(self, nursery: trio.Nursery, tasks: TaskService) -> None:
        self._nursery = nursery
        self._tasks = tasks
        #: the sandbox CreateSandbox described: (id, netns path or None, settings)
        self._created: tuple[str, str | None, PodSettings] | None = None
        self._created_at: datetime.datetime | None = None
        #: set once no sandbox will run any more (stopped, or shut down before it started)
        self._gone = trio.Event()

    # -- which sandbox ----------------------------------------------------------

    def _check(self, sandbox_id: str) -> str:
        """``sandbox_id`` if it is the one this shim serves; NotFound otherwise."""
        if self._created is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found: this shim has created none")
        if sandbox_id != self._created[0]:
            raise NotFoundError(
                f"sandbox {sandbox_id} not found: this shim serves sandbox {self._created[0]}"
            )
        return sandbox_id

    def _started(self, sandbox_id: str) -> Sandbox:
        self._check(sandbox_id)
        sandbox = self._tasks.sandbox
        if sandbox is None:
            raise FailedPreconditionError(f"sandbox {sandbox_id} has not been started")
        return sandbox

    async def _watch(self, sandbox: Sandbox) -> None:
        await sandbox.stopped.wait()
        self._gone.set()

    # -- RPCs -------------------------------------------------------------------

    async def CreateSandbox(
        self, request: sandbox_pb2.CreateSandboxRequest, ctx: object
    ) -> sandbox_pb2.CreateSandboxResponse:
        """Record the pod's netns and settings; the VM boots at StartSandbox."""
        sid = request.sandbox_id
        if self._created is not None or self._tasks.sandbox is not None:
            raise AlreadyExistsError(f"sandbox {sid}: this shim already serves a sandbox")
        if not sid:
            raise FailedPreconditionError("CreateSandbox needs a sandbox id")
        settings = pod_settings(sid, request.options, request.annotations)
        self._created = (sid, request.netns_path or None, settings)
        self._tasks.serves_sandbox_api = True
        return sandbox_pb2.CreateSandboxResponse()

    async def StartSandbox(
        self, request: sandbox_pb2.StartSandboxRequest, ctx: object
    ) -> sandbox_pb2.StartSandboxResponse:
        """Boot the VM with the pod's network; answer once its agent is ready."""
        sid = self._check(request.sandbox_id)
        assert self._created is not None
        _, netns, settings = self._created
        first = self._tasks.sandbox is None
        sandbox = self._tasks.boot_pod(sid, netns, settings)
        if first:
            self._created_at = now()
            self._nursery.start_soon(self._watch, sandbox)
        await sandbox.ready()
        return sandbox_pb2.StartSandboxResponse(
            pid=os.getpid(), created_at=timestamp(self._created_at)
        )

    async def Platform(
        self, request: sandbox_pb2.PlatformRequest, ctx: object
    ) -> sandbox_pb2.PlatformResponse:
        """Linux on the host's architecture: the guest runs the host's kernel arch."""
        self._check(request.sandbox_id)
        machine = platform.machine()
        return sandbox_pb2.PlatformResponse(
            platform=sandbox_pb2.Platform(
                os="linux", architecture=_ARCHITECTURES.get(machine, machine)
            )
        )

    async def StopSandbox(
        self, request: sandbox_pb2.StopSandboxRequest, ctx: object
    ) -> sandbox_pb2.StopSandboxResponse:
        """Stop the VM and reclaim its host resources (its tasks exit); return once done."""
        self._check(request.sandbox_id)
        sandbox = self._tasks.sandbox
        if sandbox is None:
            self._gone.set()
            return sandbox_pb2.StopSandboxResponse()
        sandbox.stop()
        await sandbox.stopped.wait()
        return sandbox_pb2.StopSandboxResponse()

    async def WaitSandbox(
        self, request: sandbox_pb2.WaitSandboxRequest, ctx: object
    ) -> sandbox_pb2.WaitSandboxResponse:
        """Block until the VM is gone: status 0 when stopped, 137 when it died by itself."""
        self._check(request.sandbox_id)
        await self._gone.wait()
        sandbox = self._tasks.sandbox
        if sandbox is None:
            return sandbox_pb2.WaitSandboxResponse(exit_status=0, exited_at=timestamp(now()))
        return sandbox_pb2.WaitSandboxResponse(
            exit_status=KILLED_STATUS if sandbox.lost is not None else 0,
            exited_at=timestamp(sandbox.stopped_at),
        )

    async def SandboxStatus(
        self, request: sandbox_pb2.SandboxStatusRequest, ctx: object
    ) -> sandbox_pb2.SandboxStatusResponse:
        """Ready while the VM runs its agent; with ``verbose``, what runs it."""
        sid = self._check(request.sandbox_id)
        sandbox = self._tasks.sandbox
        running = sandbox is not None and not sandbox.stopped.is_set() and sandbox.running
        info: dict[str, str] = {}
        if request.verbose and sandbox is not None:
            info = {
                "hypervisor": sandbox.hypervisor.name,
                "vcpus": str(sandbox.resizer.size.vcpus),
                "memory_mib": str(sandbox.resizer.size.memory_mib),
                "containers": str(len(sandbox.containers)),
            }
        return sandbox_pb2.SandboxStatusResponse(
            sandbox_id=sid,
            pid=os.getpid(),
            state=READY if running else NOT_READY,
            info=info,
            created_at=timestamp(self._created_at),
            exited_at=timestamp(sandbox.stopped_at if sandbox is not None else None),
        )

    async def PingSandbox(
        self, request: sandbox_pb2.PingRequest, ctx: object
    ) -> sandbox_pb2.PingResponse:
        """Answer while the sandbox lives: its agent must answer a health check."""
        sandbox = self._started(request.sandbox_id)
        await sandbox.agent.check()
        return sandbox_pb2.PingResponse()

    async def ShutdownSandbox(
        self, request: sandbox_pb2.ShutdownSandboxRequest, ctx: object
    ) -> sandbox_pb2.ShutdownSandboxResponse:
        """End the shim: the VM (if still there) and every host resource go first."""
        self._check(request.sandbox_id)
        if self._tasks.sandbox is None:
            self._gone.set()
        self._tasks.shutdown_requested.set()
        return sandbox_pb2.ShutdownSandboxResponse()

    async def SandboxMetrics(
        self, request: sandbox_pb2.SandboxMetricsRequest, ctx: object
    ) -> sandbox_pb2.SandboxMetricsResponse:
        """The pod's cgroups v2 figures: the sum of its containers' in the guest."""
        sid = request.sandbox_id
        sandbox = self._started(sid)
        agent = sandbox.agent
        each: list[cgroups_v2_pb2.Metrics] = []
        for container_id in list(sandbox.containers):
            each.append(metrics.from_agent(await agent.stats_container(container_id)))
        return sandbox_pb2.SandboxMetricsResponse(
            metrics=sandbox_pb2.Metric(
                timestamp=timestamp(now()), id=sid, data=metrics.pack(metrics.total(each))
            )
        )
