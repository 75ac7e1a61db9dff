"""``grpc.AgentService``: Kata's agent API, served by husk's ttrpc server.

Each method is named exactly like its RPC (the ttrpc server routes by name) and
takes ``(request, ctx)``. They delegate to :class:`Sandbox` and friends; errors
are husk's typed errors, which the server turns into statuses, so a bad request
never takes the agent down. RPCs this agent does not do answer UNIMPLEMENTED
with a sentence saying so.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from google.protobuf import empty_pb2

from agent_proto import agent_pb2, types_pb2
from common.errors import FailedPreconditionError, UnimplementedError
from guest.agent import metrics, system
from guest.agent.network import Network
from guest.agent.process import Process
from guest.agent.sandbox import Sandbox

log = logging.getLogger("husk.agent.service")

Empty = empty_pb2.Empty

UNIMPLEMENTED = {
    "UpdateEphemeralMounts": "ephemeral (k8s emptyDir on tmpfs) mounts are not supported",
    "RemoveStaleVirtiofsShareMounts": "husk does not track virtio-fs share mounts",
    "GetIPTables": "the guest image has no iptables",
    "SetIPTables": "the guest image has no iptables",
    "MemAgentMemcgSet": "the memory agent is not part of husk",
    "MemAgentCompactSet": "the memory agent is not part of husk",
    "AddSwap": "swap devices are not supported",
    "ResizeVolume": "volume resizing is not supported",
    "SetPolicy": "agent policies are not supported",
}


def _unimplemented(name: str, reason: str) -> Any:
    async def handler(self: AgentService, request: object, ctx: object) -> None:
        raise UnimplementedError(f"the husk agent does not implement {name}: {reason}")

    handler.__name__ = name
    handler.__doc__ = f"UNIMPLEMENTED: {reason}."
    return handler


class AgentService:
    """The agent's RPCs over one :class:`Sandbox`."""

    def __init__(self, sandbox: Sandbox, network: Network) -> None:
        self.sandbox = sandbox
        self.network = network
        self.destroyed = trio.Event()
        """Set when DestroySandbox has finished; the server then stops."""

    def _guest_only(self, what: str) -> None:
        if self.sandbox.config.host_mode:
            raise FailedPreconditionError(f"{what} changes the machine; refused in host mode")

    # --- sandbox ---------------------------------------------------------------

    async def CreateSandbox(self, request: agent_pb2.CreateSandboxRequest, ctx: object) -> Empty:
        """Hostname, DNS and the sandbox's shared storages (guest hooks are ignored)."""
        await self.sandbox.create(request)
        return Empty()

    async def DestroySandbox(self, request: agent_pb2.DestroySandboxRequest, ctx: object) -> Empty:
        """Remove every container and unmount; the server stops after answering."""
        await self.sandbox.destroy()
        self.destroyed.set()
        return Empty()

    async def ResetSandbox(self, request: agent_pb2.ResetSandboxRequest, ctx: object) -> Empty:
        """husk's own: undo CreateSandbox but keep serving (a pool VM becomes blank again)."""
        sandbox_id = self.sandbox.id
        await self.sandbox.reset()
        log.info("sandbox %s reset: ready for CreateSandbox", sandbox_id or "(no id)")
        return Empty()

    # --- containers ------------------------------------------------------------

    async def CreateContainer(
        self, request: agent_pb2.CreateContainerRequest, ctx: object
    ) -> Empty:
        """``runc create`` the container; its init process waits for StartContainer."""
        await self.sandbox.create_container(request)
        return Empty()

    async def StartContainer(self, request: agent_pb2.StartContainerRequest, ctx: object) -> Empty:
        """``runc start``."""
        await self.sandbox.container(request.container_id).start()
        return Empty()

    async def RemoveContainer(
        self, request: agent_pb2.RemoveContainerRequest, ctx: object
    ) -> Empty:
        """Kill, ``runc delete``, unmount, forget."""
        await self.sandbox.remove_container(request.container_id, request.timeout)
        return Empty()

    async def PauseContainer(self, request: agent_pb2.PauseContainerRequest, ctx: object) -> Empty:
        """``runc pause``."""
        await self.sandbox.container(request.container_id).pause()
        return Empty()

    async def ResumeContainer(
        self, request: agent_pb2.ResumeContainerRequest, ctx: object
    ) -> Empty:
        """``runc resume``."""
        await self.sandbox.container(request.container_id).resume()
        return Empty()

    async def UpdateContainer(
        self, request: agent_pb2.UpdateContainerRequest, ctx: object
    ) -> Empty:
        """``runc update`` with the new resources."""
        await self.sandbox.container(request.container_id).update(request.resources)
        return Empty()

    async def StatsContainer(
        self, request: agent_pb2.StatsContainerRequest, ctx: object
    ) -> agent_pb2.StatsContainerResponse:
        """cgroup figures (no per-container network figures: the VM's network is shared)."""
        return self.sandbox.stats(request.container_id)

    async def GetOOMEvent(
        self, request: agent_pb2.GetOOMEventRequest, ctx: object
    ) -> agent_pb2.OOMEvent:
        """Block until the kernel OOM-kills a process of a container; that container's id."""
        return agent_pb2.OOMEvent(container_id=await self.sandbox.oom.next_event())

    # --- processes -------------------------------------------------------------

    async def ExecProcess(self, request: agent_pb2.ExecProcessRequest, ctx: object) -> Empty:
        """``runc exec --detach`` with its own stdio."""
        await self.sandbox.container(request.container_id).exec(request)
        return Empty()

    async def SignalProcess(self, request: agent_pb2.SignalProcessRequest, ctx: object) -> Empty:
        """Signal a process; an empty exec id with SIGKILL kills all of the container."""
        container = self.sandbox.container(request.container_id)
        await container.signal(request.exec_id, request.signal)
        return Empty()

    async def WaitProcess(
        self, request: agent_pb2.WaitProcessRequest, ctx: object
    ) -> agent_pb2.WaitProcessResponse:
        """Block until the process exits; its status is the exit code, or 128 + signal."""
        container = self.sandbox.container(request.container_id)
        process = container.find(request.exec_id)
        status = await process.wait()
        process.waited = True
        await container.prune(process)
        return agent_pb2.WaitProcessResponse(status=status)

    async def _read(
        self, request: agent_pb2.ReadStreamRequest, which: str
    ) -> agent_pb2.ReadStreamResponse:
        container = self.sandbox.container(request.container_id)
        process = container.find(request.exec_id)
        try:
            data = await process.io.read(which, request.len)
        finally:
            await self._prune_later(process)
        return agent_pb2.ReadStreamResponse(data=data)

    async def _prune_later(self, process: Process) -> None:
        container = self.sandbox.containers.get(process.container_id)
        if container is not None:
            await container.prune(process)

    async def ReadStdout(
        self, request: agent_pb2.ReadStreamRequest, ctx: object
    ) -> agent_pb2.ReadStreamResponse:
        """Block until output; at EOF answer OUT_OF_RANGE (Kata answers an error too)."""
        return await self._read(request, "stdout")

    async def ReadStderr(
        self, request: agent_pb2.ReadStreamRequest, ctx: object
    ) -> agent_pb2.ReadStreamResponse:
        """As ReadStdout; a process with a terminal has no separate stderr (EOF at once)."""
        return await self._read(request, "stderr")

    async def WriteStdin(
        self, request: agent_pb2.WriteStreamRequest, ctx: object
    ) -> agent_pb2.WriteStreamResponse:
        """Write all the data to the process's stdin (or terminal)."""
        process = self.sandbox.process(request.container_id, request.exec_id)
        written = await process.io.write_stdin(request.data)
        return agent_pb2.WriteStreamResponse(len=written)

    async def CloseStdin(self, request: agent_pb2.CloseStdinRequest, ctx: object) -> Empty:
        """Close the stdin pipe so the process reads EOF."""
        process = self.sandbox.process(request.container_id, request.exec_id)
        await process.io.close_stdin()
        return Empty()

    async def TtyWinResize(self, request: agent_pb2.TtyWinResizeRequest, ctx: object) -> Empty:
        """TIOCSWINSZ on the process's pty master."""
        process = self.sandbox.process(request.container_id, request.exec_id)
        process.io.resize(request.row, request.column)
        return Empty()

    # --- network ---------------------------------------------------------------

    async def UpdateInterface(
        self, request: agent_pb2.UpdateInterfaceRequest, ctx: object
    ) -> types_pb2.Interface:
        """Configure one guest link (found by MAC address)."""
        self._guest_only("UpdateInterface")
        return await self.network.update_interface(request.interface)

    async def UpdateRoutes(
        self, request: agent_pb2.UpdateRoutesRequest, ctx: object
    ) -> agent_pb2.Routes:
        """Replace the routes of the links the request names."""
        self._guest_only("UpdateRoutes")
        return await self.network.update_routes(list(request.routes.Routes))

    async def AddARPNeighbors(
        self, request: agent_pb2.AddARPNeighborsRequest, ctx: object
    ) -> Empty:
        """Permanent neighbour entries."""
        self._guest_only("AddARPNeighbors")
        await self.network.add_arp_neighbors(list(request.neighbors.ARPNeighbors))
        return Empty()

    async def ListInterfaces(
        self, request: agent_pb2.ListInterfacesRequest, ctx: object
    ) -> agent_pb2.Interfaces:
        """Every guest link with its addresses."""
        return await self.network.list_interfaces()

    async def ListRoutes(
        self, request: agent_pb2.ListRoutesRequest, ctx: object
    ) -> agent_pb2.Routes:
        """The guest's routes."""
        return await self.network.list_routes()

    # --- the guest machine -----------------------------------------------------

    async def GetGuestDetails(
        self, request: agent_pb2.GuestDetailsRequest, ctx: object
    ) -> agent_pb2.GuestDetailsResponse:
        """Memory block size, probe support, agent version."""
        return system.guest_details(request, self.sandbox.config.sysfs)

    async def GetMetrics(
        self, request: agent_pb2.GetMetricsRequest, ctx: object
    ) -> agent_pb2.Metrics:
        """The guest's memory and CPU figures, as Prometheus text (Kata's agent does so too)."""
        return agent_pb2.Metrics(metrics=metrics.guest_metrics())

    async def OnlineCPUMem(self, request: agent_pb2.OnlineCPUMemRequest, ctx: object) -> Empty:
        """Online hot-plugged CPUs (and memory blocks unless ``cpu_only``)."""
        self._guest_only("OnlineCPUMem")
        layout = self.sandbox.config.sysfs
        with trio.move_on_after(5 if request.wait else 0.5):
            while True:
                system.online_cpus(layout)
                if not request.cpu_only:
                    system.online_memory(layout)
                if not request.nb_cpus or system.count_online_cpus(layout) >= request.nb_cpus:
                    return Empty()
                await trio.sleep(0.05)
        if request.wait:
            raise FailedPreconditionError(
                f"only {system.count_online_cpus(layout)} of {request.nb_cpus} CPUs came online"
            )
        return Empty()

    async def MemHotplugByProbe(
        self, request: agent_pb2.MemHotplugByProbeRequest, ctx: object
    ) -> Empty:
        """Write each address to /sys/devices/system/memory/probe."""
        self._guest_only("MemHotplugByProbe")
        system.mem_hotplug_probe(list(request.memHotplugProbeAddr), self.sandbox.config.sysfs)
        return Empty()

    async def SetGuestDateTime(
        self, request: agent_pb2.SetGuestDateTimeRequest, ctx: object
    ) -> Empty:
        """Set the wall clock."""
        self._guest_only("SetGuestDateTime")
        system.set_time(request.Sec, request.Usec)
        return Empty()

    async def ReseedRandomDev(
        self, request: agent_pb2.ReseedRandomDevRequest, ctx: object
    ) -> Empty:
        """Mix the host's random bytes into the guest's pool."""
        self._guest_only("ReseedRandomDev")
        system.reseed_random(request.data)
        return Empty()

    async def CopyFile(self, request: agent_pb2.CopyFileRequest, ctx: object) -> Empty:
        """Write a chunk of a file below /run (the configured root)."""
        system.copy_file(request, self.sandbox.config.copy_file_root)
        return Empty()


for _name, _reason in UNIMPLEMENTED.items():
    setattr(AgentService, _name, _unimplemented(_name, _reason))
