"""The shim's side of the guest agent protocol (Kata's ``AgentService`` + ``Health``).

    async with AgentClient.open(stream, request_timeout=60) as agent:
        await agent.check()
        await agent.create_container(request)

``wait_ready`` connects through :mod:`shim.agent.transport` and polls ``Health.Check``
until the agent answers: on virtio-serial the bytes sent before the guest opens
its port are lost, so each attempt has a short deadline and is retried on the
same connection; a late answer to an abandoned attempt is dropped by the ttrpc
client (it names a finished stream).

Calls that wait on the guest's processes (``wait_process``, ``read_stdout``,
``read_stderr``) have no deadline; every other call has ``request_timeout``,
and its round trip, when answered, feeds the sandbox's latency histogram
(:data:`shim.metrics.recorder.AGENT_RPC`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from agent_proto import agent_pb2, health_pb2, types_pb2
from shim.agent.transport import connect, describe
from shim.errors import AgentReplyError, DeadlineExceededError
from shim.hypervisor import AgentEndpoint
from shim.metrics.recorder import AGENT_RPC
from ttrpc import (
    Client,
    ConnectionClosed,
    DeadlineExceeded,
    InvalidPayload,
    ProtocolError,
    RpcError,
)

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
READ_CHUNK = 64 * 1024
#: a new Health.Check goes out this often while the guest boots: one sent before
#: the guest opens its end is never answered, so the agent is seen within this
#: long of its first answer, not within a whole probe's deadline (it was 0.5 s:
#: every boot waited 0.25 s on average after the agent was ready)
PROBE_INTERVAL = 0.1
#: how long each Health.Check waits for its answer (a first answer under TCG is slow)
PROBE_DEADLINE = 0.5

M = TypeVar("M", bound=Message)


class AgentClient:
    """Typed calls to one guest agent over one ttrpc connection."""

    def __init__(self, client: Client, request_timeout: float) -> None:
        self._client = client
        self.request_timeout = request_timeout

    @classmethod
    @asynccontextmanager
    async def open(
        cls, stream: trio.abc.Stream, *, request_timeout: float = 60.0
    ) -> AsyncIterator[AgentClient]:
        """Run a client on ``stream`` for the body of the ``async with``.

        An error raised in the body is carried past ``Client.open`` and
        re-raised here: ``Client.open`` closes the stream in a cancelled scope on
        the way out, whose ``Cancelled`` would otherwise replace it.
        """
        error: Exception | None = None
        async with Client.open(stream) as client:
            try:
                yield cls(client, request_timeout)
            except Exception as e:
                error = e
        if error is not None:
            raise error

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection to the agent ended, or None while it is up."""
        return self._client.closed

    async def _call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None,
    ) -> M:
        if timeout is None:  # a blocking wait: its time is the guest's, not a round trip
            return await self._checked_call(service, method, request, response_type, None)
        started = time.monotonic()
        try:
            response = await self._checked_call(service, method, request, response_type, timeout)
        except DeadlineExceeded:
            raise
        except (RpcError, AgentReplyError):
            AGENT_RPC.observe((method,), time.monotonic() - started)
            raise
        AGENT_RPC.observe((method,), time.monotonic() - started)
        return response

    async def _checked_call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None,
    ) -> M:
        """A call whose answer, if it is not a valid reply, fails it (and nothing else)."""
        try:
            return await self._client.call(service, method, request, response_type, timeout=timeout)
        except (InvalidPayload, ProtocolError) as e:
            raise AgentReplyError(
                f"the guest agent's answer to {method} is not valid: {e}"
            ) from None

    async def _agent(
        self, method: str, request: Message, response_type: type[M], *, wait: bool = False
    ) -> M:
        timeout = None if wait else self.request_timeout
        return await self._call(AGENT_SERVICE, method, request, response_type, timeout)

    # -- health ---------------------------------------------------------------

    async def check(self, timeout: float | None = None) -> health_pb2.HealthCheckResponse:
        """``Health.Check``: is the agent serving?"""
        return await self._call(
            HEALTH_SERVICE,
            "Check",
            health_pb2.CheckRequest(),
            health_pb2.HealthCheckResponse,
            self.request_timeout if timeout is None else timeout,
        )

    async def version(self) -> health_pb2.VersionCheckResponse:
        """``Health.Version``: the agent's version and protocol version."""
        return await self._call(
            HEALTH_SERVICE,
            "Version",
            health_pb2.CheckRequest(),
            health_pb2.VersionCheckResponse,
            self.request_timeout,
        )

    async def poll_ready(self, timeout: float, what: str = "the agent") -> None:
        """Send ``Health.Check`` every :data:`PROBE_INTERVAL` until one is answered or
        ``timeout``; each waits up to :data:`PROBE_DEADLINE`, so at most a few are in
        flight. Any error other than a probe's deadline ends the polling with it."""
        deadline = trio.current_time() + timeout
        done = trio.Event()
        failure: Exception | None = None

        async def probe(wait: float) -> None:
            nonlocal failure
            try:
                await self.check(timeout=wait)
            except DeadlineExceeded:
                return
            except Exception as e:
                failure = failure or e
            done.set()

        async with trio.open_nursery() as nursery:
            while not done.is_set():
                left = deadline - trio.current_time()
                if left <= 0:
                    break
                nursery.start_soon(probe, min(PROBE_DEADLINE, left))
                with trio.move_on_after(min(PROBE_INTERVAL, left)):
                    await done.wait()
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if not done.is_set():
            raise DeadlineExceededError(
                f"{what} did not answer Health.Check within {timeout:g} s; "
                "see the sandbox's console log"
            )

    # -- sandbox --------------------------------------------------------------

    async def create_sandbox(self, request: agent_pb2.CreateSandboxRequest) -> None:
        """``CreateSandbox``: hostname, shared storages; before any container."""
        await self._agent("CreateSandbox", request, empty_pb2.Empty)

    async def reseed_random_dev(self, data: bytes) -> None:
        """``ReseedRandomDev``: mix ``data`` into the guest's RNG and reseed it."""
        request = agent_pb2.ReseedRandomDevRequest(data=data)
        await self._agent("ReseedRandomDev", request, empty_pb2.Empty)

    async def set_guest_date_time(self, seconds: int, microseconds: int) -> None:
        """``SetGuestDateTime``: the guest's wall clock."""
        request = agent_pb2.SetGuestDateTimeRequest(Sec=seconds, Usec=microseconds)
        await self._agent("SetGuestDateTime", request, empty_pb2.Empty)

    async def destroy_sandbox(self) -> None:
        """``DestroySandbox``: the agent stops every container and unmounts."""
        await self._agent("DestroySandbox", agent_pb2.DestroySandboxRequest(), empty_pb2.Empty)

    async def reset_sandbox(self) -> None:
        """``ResetSandbox`` (husk's own): the agent undoes CreateSandbox and keeps serving."""
        await self._agent("ResetSandbox", agent_pb2.ResetSandboxRequest(), empty_pb2.Empty)

    async def get_oom_event(self) -> str:
        """``GetOOMEvent``: block until a container is OOM-killed; its id."""
        event = await self._agent(
            "GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent, wait=True
        )
        return event.container_id

    async def get_metrics(self, timeout: float | None = None) -> str:
        """``GetMetrics``: the guest's figures as Prometheus text (untrusted: parse with care)."""
        response = await self._call(
            AGENT_SERVICE,
            "GetMetrics",
            agent_pb2.GetMetricsRequest(),
            agent_pb2.Metrics,
            self.request_timeout if timeout is None else timeout,
        )
        return response.metrics

    # -- containers and processes ----------------------------------------------

    async def create_container(self, request: agent_pb2.CreateContainerRequest) -> None:
        """``CreateContainer``: mounts storages and creates (not starts) the init process."""
        await self._agent("CreateContainer", request, empty_pb2.Empty)

    async def start_container(self, container_id: str) -> None:
        """``StartContainer``: run the init process."""
        request = agent_pb2.StartContainerRequest(container_id=container_id)
        await self._agent("StartContainer", request, empty_pb2.Empty)

    async def remove_container(self, container_id: str, timeout: int = 0) -> None:
        """``RemoveContainer``: delete the container and its storages in the guest."""
        request = agent_pb2.RemoveContainerRequest(container_id=container_id, timeout=timeout)
        await self._agent("RemoveContainer", request, empty_pb2.Empty)

    async def exec_process(self, request: agent_pb2.ExecProcessRequest) -> None:
        """``ExecProcess``: start an additional process in a running container."""
        await self._agent("ExecProcess", request, empty_pb2.Empty)

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        """``SignalProcess``: deliver ``signal``; empty ``exec_id`` is the init process."""
        request = agent_pb2.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal
        )
        await self._agent("SignalProcess", request, empty_pb2.Empty)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """``WaitProcess``: block until the process exits; its exit status."""
        request = agent_pb2.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        response = await self._agent(
            "WaitProcess", request, agent_pb2.WaitProcessResponse, wait=True
        )
        return response.status

    async def pause_container(self, container_id: str) -> None:
        """``PauseContainer``: freeze the container's cgroup."""
        request = agent_pb2.PauseContainerRequest(container_id=container_id)
        await self._agent("PauseContainer", request, empty_pb2.Empty)

    async def resume_container(self, container_id: str) -> None:
        """``ResumeContainer``: thaw the container's cgroup."""
        request = agent_pb2.ResumeContainerRequest(container_id=container_id)
        await self._agent("ResumeContainer", request, empty_pb2.Empty)

    async def update_container(self, request: agent_pb2.UpdateContainerRequest) -> None:
        """``UpdateContainer``: new cgroup limits."""
        await self._agent("UpdateContainer", request, empty_pb2.Empty)

    async def stats_container(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        """``StatsContainer``: the container's cgroup statistics."""
        request = agent_pb2.StatsContainerRequest(container_id=container_id)
        return await self._agent("StatsContainer", request, agent_pb2.StatsContainerResponse)

    # -- the guest machine --------------------------------------------------------

    async def online_cpu_mem(self, nb_cpus: int, *, cpu_only: bool) -> None:
        """``OnlineCPUMem``: bring hot-added vCPUs (and memory) online; ``nb_cpus`` in total."""
        request = agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=nb_cpus, cpu_only=cpu_only)
        await self._agent("OnlineCPUMem", request, empty_pb2.Empty)

    # -- network ----------------------------------------------------------------

    async def update_interface(self, interface: types_pb2.Interface) -> types_pb2.Interface:
        """``UpdateInterface``: name, MTU and addresses of the guest NIC with that MAC."""
        request = agent_pb2.UpdateInterfaceRequest(interface=interface)
        return await self._agent("UpdateInterface", request, types_pb2.Interface)

    async def update_routes(self, routes: agent_pb2.Routes) -> agent_pb2.Routes:
        """``UpdateRoutes``: replace the routes of the devices named; the guest's table."""
        request = agent_pb2.UpdateRoutesRequest(routes=routes)
        return await self._agent("UpdateRoutes", request, agent_pb2.Routes)

    async def add_arp_neighbors(self, neighbors: agent_pb2.ARPNeighbors) -> None:
        """``AddARPNeighbors``: static neighbour entries in the guest."""
        request = agent_pb2.AddARPNeighborsRequest(neighbors=neighbors)
        await self._agent("AddARPNeighbors", request, empty_pb2.Empty)

    # -- stdio ------------------------------------------------------------------

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """``WriteStdin``: how many bytes the agent accepted."""
        request = agent_pb2.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data
        )
        response = await self._agent("WriteStdin", request, agent_pb2.WriteStreamResponse)
        return response.len

    async def read_stdout(self, container_id: str, exec_id: str, size: int = READ_CHUNK) -> bytes:
        """``ReadStdout``: the next bytes; raises ``RpcError`` at EOF (as Kata's agent)."""
        request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        response = await self._agent("ReadStdout", request, agent_pb2.ReadStreamResponse, wait=True)
        return response.data

    async def read_stderr(self, container_id: str, exec_id: str, size: int = READ_CHUNK) -> bytes:
        """``ReadStderr``: the next bytes; raises ``RpcError`` at EOF."""
        request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        response = await self._agent("ReadStderr", request, agent_pb2.ReadStreamResponse, wait=True)
        return response.data

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        """``CloseStdin``: the process reads EOF."""
        request = agent_pb2.CloseStdinRequest(container_id=container_id, exec_id=exec_id)
        await self._agent("CloseStdin", request, empty_pb2.Empty)

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        """``TtyWinResize``: new terminal size."""
        request = agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=cols
        )
        await self._agent("TtyWinResize", request, empty_pb2.Empty)


@asynccontextmanager
async def wait_ready(
    endpoint: AgentEndpoint,
    timeout: float,
    *,
    request_timeout: float = 60.0,
    dial: Callable[[AgentEndpoint, float], Awaitable[trio.abc.Stream]] = connect,
) -> AsyncIterator[AgentClient]:
    """Connect to the agent at ``endpoint`` and yield a client once it answers.

    ``timeout`` bounds both the connect and the Health.Check polling; ``dial``
    (default :func:`shim.agent.transport.connect`) opens the stream.
    """
    started = trio.current_time()
    stream = await dial(endpoint, timeout)
    async with AgentClient.open(stream, request_timeout=request_timeout) as agent:
        left = max(timeout - (trio.current_time() - started), 0.0)
        await agent.poll_ready(left, what=f"agent at {describe(endpoint)}")
        yield agent
