"""Synchronous gRPC clients for containerd's CRI plugin and its Tasks service.

``CriClient`` calls CRI v1 the way the kubelet does; ``TasksClient`` calls
``containerd.services.tasks.v1.Tasks`` for what ``ctr`` 1.6 lacks (``Update``,
``Metrics``). Both speak gRPC over containerd's unix socket through grpclib.

Why synchronous, and why a thread: grpclib runs on asyncio while husk's async
tests run on trio, and most CRI tests are plain pytest functions. Each client
therefore owns one asyncio loop in a daemon thread, with one grpclib
``Channel`` (one HTTP/2 connection, as the kubelet keeps one) created on that
loop; a call is submitted with ``run_coroutine_threadsafe`` and the caller
blocks on the result. Compared with ``asyncio.run`` per call, this keeps one
connection for the client's lifetime, works from any thread (including a trio
test's ``trio.to_thread.run_sync``) and never starts an event loop in the
caller's thread. ``close()`` (or leaving the ``with`` block) closes the channel
and stops the thread.

A failed call raises grpclib's ``GRPCError`` (``.status`` is a
``grpclib.Status``), re-exported here.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

from google.protobuf import any_pb2
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.kubelet import containerd_tasks_pb2 as tasks
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.containerd_metrics_pb2 import Metric
from tests.kubelet.containerd_tasks_grpc import TasksStub
from tests.kubelet.cri_api_grpc import ImageServiceStub, RuntimeServiceStub

__all__ = [
    "LINUX_RESOURCES_TYPE_URL",
    "CriClient",
    "ExecResult",
    "GRPCError",
    "Status",
    "TasksClient",
]

#: how containerd's typeurl names runtime-spec's LinuxResources (JSON-encoded)
LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
#: gRPC metadata key carrying the containerd namespace of a call
NAMESPACE_HEADER = "containerd-namespace"
#: the machine may be busy with VMs: calls get a generous deadline by default
DEFAULT_TIMEOUT = 120.0

_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")


class ExecResult(NamedTuple):
    """What ExecSync returned: unpacks as ``(exit_code, stdout, stderr)``."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class _ChannelThread:
    """One asyncio loop in a daemon thread, owning one grpclib Channel."""

    def __init__(self, socket_path: str, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.channel = self.submit(self._open(socket_path)).result()

    @staticmethod
    async def _open(socket_path: str) -> Channel:
        # grpclib binds a Channel to the loop current when it is made.
        return Channel(path=socket_path)

    def submit(self, coro: Any) -> Future[Any]:
        """Schedule ``coro`` on the loop thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(
        self,
        method: UnaryUnaryMethod[_Req, _Rep],
        request: _Req,
        timeout: float,
        metadata: Mapping[str, str] | None = None,
    ) -> _Rep:
        """Run one unary call and wait for its reply (or its GRPCError)."""
        meta = dict(metadata) if metadata else None
        future = self.submit(method(request, timeout=timeout, metadata=meta))
        try:
            result: _Rep = future.result(timeout + 10.0)
        except TimeoutError:
            future.cancel()  # grpclib missed its own deadline: do not leave the call running
            raise
        return result

    def close(self) -> None:
        """Close the channel, stop the loop and join the thread; idempotent."""
        if self._loop.is_closed():
            return

        async def shut() -> None:
            self.channel.close()

        self.submit(shut()).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()


class _SyncClient:
    def __init__(self, address: str, timeout: float, name: str) -> None:
        self.address = address
        self.timeout = timeout
        self._io = _ChannelThread(address, name)

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        self._io.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CriClient(_SyncClient):
    """The kubelet's side of CRI v1 against containerd's socket (namespace k8s.io).

    Methods take and return the messages of ``cri_api_pb2``; IDs are strings.
    ``timeout`` is the deadline, in seconds, of every call.
    """

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(address, timeout, "cri-client")
        self._runtime = RuntimeServiceStub(self._io.channel)
        self._images = ImageServiceStub(self._io.channel)

    def _call(
        self, method: UnaryUnaryMethod[_Req, _Rep], request: _Req, timeout: float | None = None
    ) -> _Rep:
        return self._io.call(method, request, self.timeout if timeout is None else timeout)

    # ---- runtime ----

    def version(self) -> cri.VersionResponse:
        """The runtime's name and versions (CRI ``Version``)."""
        return self._call(self._runtime.Version, cri.VersionRequest(version="v1"))

    # ---- pod sandboxes ----

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, runtime_handler: str = "") -> str:
        """Create and start a pod sandbox with ``runtime_handler`` ("" = default); its ID."""
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self._call(self._runtime.RunPodSandbox, request).pod_sandbox_id

    def pod_sandbox_status(
        self, pod_id: str, verbose: bool = False
    ) -> cri.PodSandboxStatusResponse:
        """The sandbox's status; with ``verbose``, ``info["info"]`` is JSON (pid, netns, ...)."""
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self._call(self._runtime.PodSandboxStatus, request)

    def stop_pod_sandbox(self, pod_id: str) -> None:
        """Stop the sandbox's containers and release its network; idempotent."""
        self._call(self._runtime.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod_sandbox(self, pod_id: str) -> None:
        """Remove a stopped sandbox and its containers; idempotent."""
        request = cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        self._call(self._runtime.RemovePodSandbox, request)

    def list_pod_sandbox(
        self,
        pod_id: str = "",
        state: cri.PodSandboxState | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[cri.PodSandbox]:
        """Sandboxes matching every given filter (none: all of them)."""
        filt = cri.PodSandboxFilter(id=pod_id, label_selector=dict(labels or {}))
        if state is not None:
            filt.state.state = state
        reply = self._call(self._runtime.ListPodSandbox, cri.ListPodSandboxRequest(filter=filt))
        return list(reply.items)

    # ---- containers ----

    def create_container(
        self, pod_id: str, config: cri.ContainerConfig, sandbox_config: cri.PodSandboxConfig
    ) -> str:
        """Create a container in the pod (``sandbox_config`` as given to RunPodSandbox); its ID."""
        request = cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
        )
        return self._call(self._runtime.CreateContainer, request).container_id

    def start_container(self, container_id: str) -> None:
        """Start a created container."""
        request = cri.StartContainerRequest(container_id=container_id)
        self._call(self._runtime.StartContainer, request)

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        """Stop a container: SIGTERM (or the image's stop signal), SIGKILL after ``timeout`` s."""
        request = cri.StopContainerRequest(container_id=container_id, timeout=timeout)
        self._call(self._runtime.StopContainer, request, self.timeout + timeout)

    def remove_container(self, container_id: str) -> None:
        """Remove a container (killing it if it still runs); idempotent."""
        request = cri.RemoveContainerRequest(container_id=container_id)
        self._call(self._runtime.RemoveContainer, request)

    def container_status(
        self, container_id: str, verbose: bool = False
    ) -> cri.ContainerStatusResponse:
        """The container's status; with ``verbose``, ``info["info"]`` is JSON (pid, spec...)."""
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._call(self._runtime.ContainerStatus, request)

    def list_containers(
        self,
        pod_id: str = "",
        container_id: str = "",
        state: cri.ContainerState | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[cri.Container]:
        """Containers matching every given filter (none: all of them)."""
        filt = cri.ContainerFilter(
            id=container_id, pod_sandbox_id=pod_id, label_selector=dict(labels or {})
        )
        if state is not None:
            filt.state.state = state
        reply = self._call(self._runtime.ListContainers, cri.ListContainersRequest(filter=filt))
        return list(reply.containers)

    def update_container_resources(
        self,
        container_id: str,
        linux: cri.LinuxContainerResources,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Apply new Linux resources (CPU, memory, ...) to a running container."""
        request = cri.UpdateContainerResourcesRequest(
            container_id=container_id, linux=linux, annotations=dict(annotations or {})
        )
        self._call(self._runtime.UpdateContainerResources, request)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 0) -> ExecResult:
        """Run ``cmd`` in the container and wait; ``timeout`` s (0 = none) bounds the command."""
        request = cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        reply = self._call(self._runtime.ExecSync, request, self.timeout + timeout)
        return ExecResult(reply.exit_code, reply.stdout, reply.stderr)

    # ---- stats ----

    def container_stats(self, container_id: str) -> cri.ContainerStats:
        """CPU, memory and writable-layer usage of one container."""
        request = cri.ContainerStatsRequest(container_id=container_id)
        return self._call(self._runtime.ContainerStats, request).stats

    def list_container_stats(
        self,
        container_id: str = "",
        pod_sandbox_id: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[cri.ContainerStats]:
        """Stats of the containers matching every given filter (none: all of them)."""
        filt = cri.ContainerStatsFilter(
            id=container_id, pod_sandbox_id=pod_sandbox_id, label_selector=dict(labels or {})
        )
        request = cri.ListContainerStatsRequest(filter=filt)
        return list(self._call(self._runtime.ListContainerStats, request).stats)

    # ---- images ----

    def list_images(self, image: str = "") -> list[cri.Image]:
        """Images the CRI plugin knows, optionally only ``image``."""
        filt = cri.ImageFilter(image=cri.ImageSpec(image=image)) if image else None
        return list(self._call(self._images.ListImages, cri.ListImagesRequest(filter=filt)).images)

    def image_status(self, image: str, verbose: bool = False) -> cri.Image | None:
        """The image named ``image`` (reference or ID), or None if containerd lacks it."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=verbose)
        reply = self._call(self._images.ImageStatus, request)
        return reply.image if reply.HasField("image") else None


class TasksClient(_SyncClient):
    """containerd's Tasks service (``Update``, ``Metrics``) in one containerd namespace.

    ``namespace`` is the default for every call; each method can override it.
    """

    def __init__(
        self, address: str, namespace: str = "default", timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(address, timeout, "tasks-client")
        self.namespace = namespace
        self._tasks = TasksStub(self._io.channel)

    def _meta(self, namespace: str | None) -> dict[str, str]:
        return {NAMESPACE_HEADER: namespace or self.namespace}

    def update(
        self,
        container_id: str,
        resources: Mapping[str, Any],
        namespace: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Apply runtime-spec ``LinuxResources`` (a JSON-shaped dict) to a running task.

        ``resources`` uses the OCI spec's JSON names, e.g.
        ``{"memory": {"limit": 64 << 20}, "cpu": {"shares": 512}}``. It travels as
        containerd's ``typeurl`` packs it: an Any with ``LINUX_RESOURCES_TYPE_URL``
        and the JSON bytes, which the shim hands to ``runc update``.
        """
        packed = any_pb2.Any(
            type_url=LINUX_RESOURCES_TYPE_URL, value=json.dumps(dict(resources)).encode()
        )
        request = tasks.UpdateTaskRequest(
            container_id=container_id, resources=packed, annotations=dict(annotations or {})
        )
        self._io.call(self._tasks.Update, request, self.timeout, self._meta(namespace))

    def metrics(self, filters: Sequence[str] = (), namespace: str | None = None) -> list[Metric]:
        """One ``Metric`` per matching task; ``filters`` are containerd filters, e.g. ``id==c1``.

        ``Metric.data`` is the shim's stats message as an Any (for runc on cgroup v1,
        ``io.containerd.cgroups.v1.Metrics``), left undecoded.
        """
        request = tasks.MetricsRequest(filters=list(filters))
        reply = self._io.call(self._tasks.Metrics, request, self.timeout, self._meta(namespace))
        return list(reply.metrics)
