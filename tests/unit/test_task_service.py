"""The task service over a fake hypervisor and a fake agent on in-memory streams.

The fake agent serves Kata's AgentService over husk's real ttrpc; its
"processes" echo their args and stdin to stdout. Fakes stand in for the VM here
only; the proof is tests/integration/test_shim_containerd.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from google.protobuf import any_pb2, empty_pb2

from agent_proto import agent_pb2, events_pb2, health_pb2, mount_pb2, task_pb2, types_pb2
from shim.containerd.events import RecordingPublisher, envelope, topic_of
from shim.containerd.task_service import TaskService
from shim.errors import HuskError
from shim.hypervisor import (
    AgentEndpoint,
    BlockDevice,
    Capabilities,
    Device,
    Hypervisor,
    NetDevice,
    SerialEndpoint,
    VmSpec,
    VmState,
)
from shim.network import Endpoint, LinkInfo, Neighbor, NetworkNotFoundError, NetworkPlan, Route
from shim.network.model import Address
from shim.network.tcfilter import Recorder
from shim.sandbox.annotations import CONTAINER_TYPE, SANDBOX_ID
from shim.sandbox.pod_network import SandboxNetwork
from shim.sandbox.sandbox import Sandbox
from shim.sandbox.state import SandboxState
from ttrpc import Code, RpcError, Server

Empty = empty_pb2.Empty


class FakeHypervisor(Hypervisor):
    """Records calls; boots nothing."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.devices: list[Device] = []

    def capabilities(self) -> Capabilities:
        return Capabilities(block_hotplug=True, net_hotplug=True, virtio_serial=True)

    async def prepare(self, spec: VmSpec) -> None:
        self.calls.append("prepare")

    async def start(self, timeout: float) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")

    async def destroy(self) -> None:
        self.calls.append("destroy")

    async def state(self) -> VmState:
        return VmState.RUNNING

    def agent_endpoint(self) -> AgentEndpoint:
        return SerialEndpoint(Path("/nonexistent/agent.sock"))

    async def add_device(self, device: Device) -> None:
        self.devices.append(device)

    async def remove_device(self, device: Device) -> None:
        self.devices.remove(device)


def pod_endpoint() -> Endpoint:
    """eth0 of a CNI-style pod: one address, a gateway, one static neighbour."""
    link = LinkInfo(
        name="eth0",
        index=2,
        kind="veth",
        mac="02:42:0a:00:00:02",
        mtu=1400,
        addresses=(Address("10.88.0.2", 24),),
        routes=(Route(dest="10.88.0.0/24", scope=253), Route(gateway="10.88.0.1")),
        neighbors=(Neighbor("10.88.0.9", "02:00:00:00:00:09"),),
    )
    device = NetDevice(id="husknet0", mac=link.mac, tap_name="tap0_husk", mtu=link.mtu)
    return Endpoint(link=link, tap_name="tap0_husk", device=device)


class FakeProcess:
    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.out_send, self.out_recv = trio.open_memory_channel[bytes](100)
        self.exited = trio.Event()
        self.status = 0
        self.started = False

    def run(self) -> None:
        self.started = True
        self.out_send.send_nowait(" ".join(self.args).encode() + b"\n")
        if "exit" in self.args:
            self.finish(int(self.args[-1]))

    def finish(self, status: int) -> None:
        if not self.exited.is_set():
            self.status = status
            self.out_send.close()
            self.exited.set()


class FakeAgent:
    """Just enough of AgentService for the task service."""

    def __init__(self) -> None:
        self.processes: dict[tuple[str, str], FakeProcess] = {}
        self.calls: list[str] = []
        self.sandbox_created = False
        self.nic_missing_for = 0
        self.interface_error = ""

    def _proc(self, cid: str, eid: str) -> FakeProcess:
        try:
            return self.processes[(cid, eid)]
        except KeyError:
            raise RpcError(Code.NOT_FOUND, f"no process {cid}/{eid}") from None

    async def CreateSandbox(self, request: Any, ctx: Any) -> Empty:
        self.sandbox_created = True
        return Empty()

    async def CreateContainer(self, request: agent_pb2.CreateContainerRequest, ctx: Any) -> Empty:
        self.calls.append(f"create {request.container_id} root={request.OCI.Root.Path}")
        self.processes[(request.container_id, "")] = FakeProcess(list(request.OCI.Process.Args))
        return Empty()

    async def StartContainer(self, request: Any, ctx: Any) -> Empty:
        self._proc(request.container_id, "").run()
        return Empty()

    async def ExecProcess(self, request: agent_pb2.ExecProcessRequest, ctx: Any) -> Empty:
        process = FakeProcess(list(request.process.Args))
        self.processes[(request.container_id, request.exec_id)] = process
        process.run()
        return Empty()

    async def WaitProcess(self, request: Any, ctx: Any) -> agent_pb2.WaitProcessResponse:
        process = self._proc(request.container_id, request.exec_id)
        await process.exited.wait()
        return agent_pb2.WaitProcessResponse(status=process.status)

    async def SignalProcess(self, request: Any, ctx: Any) -> Empty:
        self.calls.append(f"signal {request.container_id}/{request.exec_id} {request.signal}")
        self._proc(request.container_id, request.exec_id).finish(128 + request.signal)
        return Empty()

    async def ReadStdout(self, request: Any, ctx: Any) -> agent_pb2.ReadStreamResponse:
        process = self._proc(request.container_id, request.exec_id)
        try:
            data = await process.out_recv.receive()
        except trio.EndOfChannel:
            raise RpcError(Code.OUT_OF_RANGE, "EOF") from None
        return agent_pb2.ReadStreamResponse(data=data)

    async def ReadStderr(self, request: Any, ctx: Any) -> agent_pb2.ReadStreamResponse:
        await self._proc(request.container_id, request.exec_id).exited.wait()
        raise RpcError(Code.OUT_OF_RANGE, "EOF")

    async def WriteStdin(self, request: Any, ctx: Any) -> agent_pb2.WriteStreamResponse:
        process = self._proc(request.container_id, request.exec_id)
        await process.out_send.send(b"stdin:" + request.data)
        return agent_pb2.WriteStreamResponse(len=len(request.data))

    async def CloseStdin(self, request: Any, ctx: Any) -> Empty:
        self.calls.append(f"closestdin {request.container_id}/{request.exec_id}")
        self._proc(request.container_id, request.exec_id).finish(0)
        return Empty()

    async def PauseContainer(self, request: Any, ctx: Any) -> Empty:
        self.calls.append(f"pause {request.container_id}")
        return Empty()

    async def ResumeContainer(self, request: Any, ctx: Any) -> Empty:
        self.calls.append(f"resume {request.container_id}")
        return Empty()

    async def RemoveContainer(self, request: Any, ctx: Any) -> Empty:
        self.calls.append(f"remove {request.container_id}")
        self._proc(request.container_id, "").finish(137)
        return Empty()

    async def UpdateInterface(
        self, request: agent_pb2.UpdateInterfaceRequest, ctx: Any
    ) -> types_pb2.Interface:
        iface = request.interface
        if self.nic_missing_for > 0:  # a hot-added NIC takes a moment to appear
            self.nic_missing_for -= 1
            raise RpcError(Code.NOT_FOUND, f"no guest interface has MAC address {iface.hwAddr}")
        if self.interface_error:
            raise RpcError(Code.INVALID_ARGUMENT, self.interface_error)
        self.calls.append(f"interface {iface.name} {iface.hwAddr}")
        return iface

    async def UpdateRoutes(self, request: agent_pb2.UpdateRoutesRequest, ctx: Any) -> Any:
        self.calls.append(f"routes {len(request.routes.Routes)}")
        return request.routes

    async def AddARPNeighbors(self, request: agent_pb2.AddARPNeighborsRequest, ctx: Any) -> Empty:
        self.calls.append(f"neighbors {len(request.neighbors.ARPNeighbors)}")
        return Empty()

    async def Check(self, request: Any, ctx: Any) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Harness:
    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        self.tmp = tmp
        self.hypervisor = FakeHypervisor()
        self.agent = FakeAgent()
        self.publisher = RecordingPublisher()
        self.server = Server()
        self.server.register(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], self.agent)
        self.server.register(health_pb2.DESCRIPTOR.services_by_name["Health"], self.agent)
        self.nursery = nursery
        self.service = TaskService(nursery, self.make_sandbox, self.publisher)
        self.network_error: Exception | None = None
        self.netns_seen: list[str | None] = []
        self.tap_fds: list[int] = []

    async def dial(self, endpoint: AgentEndpoint, timeout: float) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.serve_stream, theirs)
        return ours

    def make_sandbox(
        self, sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]
    ) -> Sandbox:
        state = SandboxState.create(self.tmp / "state", sandbox_id)
        spec = VmSpec(sandbox_id, state.dir, 1, 128, Path("/k"), None)
        network = SandboxNetwork(
            netns,
            state,
            setup=self.setup_network,
            open_tap_fds=self.open_tap_fds,
            teardown=self.teardown_network,
        )
        return Sandbox(
            state,
            self.hypervisor,
            spec,
            boot_timeout=5,
            dial_timeout=5,
            request_timeout=5,
            network=network,
            dial=self.dial,
        )

    # a pod netns with one veth, eth0, as shim.network would plan it (no netlink here)

    def setup_network(self, netns: str | None, record: Recorder) -> NetworkPlan:
        self.netns_seen.append(netns)
        if self.network_error is not None:
            raise self.network_error
        entries = (
            {"kind": "tap", "netns": netns, "name": "tap0_husk"},
            {"kind": "ingress", "netns": netns, "name": "eth0", "ifindex": 2},
        )
        for entry in entries:
            record(dict(entry))
        return NetworkPlan(netns=netns, endpoints=(pod_endpoint(),), entries=entries)

    def open_tap_fds(self, netns: str, tap: str, queues: int) -> list[int]:
        read, write = os.pipe()
        self.tap_fds = [read, write]
        return [read, write]

    def teardown_network(self, plan: NetworkPlan) -> None:
        self.hypervisor.calls.append(f"net-teardown {plan.netns}")

    def bundle(
        self,
        cid: str,
        args: list[str],
        annotations: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> str:
        bundle = self.tmp / "bundles" / cid
        bundle.mkdir(parents=True)
        namespace = {"type": "network", "path": netns} if netns else {"type": "network"}
        spec = {
            "ociVersion": "1.0.2",
            "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0}},
            "root": {"path": "rootfs"},
            "annotations": annotations or {},
            "linux": {"namespaces": [{"type": "pid"}, namespace]},
        }
        (bundle / "config.json").write_text(__import__("json").dumps(spec))
        return str(bundle)

    def fifo(self, name: str) -> str:
        path = self.tmp / name
        os.mkfifo(path)
        return str(path)

    def create_request(
        self,
        cid: str,
        args: list[str],
        pod: str = "",
        stdin: str = "",
        stdout: str = "",
        netns: str | None = None,
    ) -> task_pb2.CreateTaskRequest:
        disk = self.tmp / f"{cid}.img"
        disk.write_bytes(b"")
        cri = {CONTAINER_TYPE: "container", SANDBOX_ID: pod} if pod else {}
        return task_pb2.CreateTaskRequest(
            id=cid,
            bundle=self.bundle(cid, args, cri, netns),
            rootfs=[mount_pb2.Mount(type="ext4", source=str(disk), options=["rw"])],
            stdin=stdin,
            stdout=stdout,
        )

    def topics(self) -> list[str]:
        return [topic_of(e) for e in self.publisher.events]


async def read_fifo(path: str) -> bytes:
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some():
            chunks.append(bytes(chunk))
    return b"".join(chunks)


async def test_create_start_wait_delete_in_order(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        out = h.fifo("out")
        request = h.create_request("c1", ["echo", "hi", "exit", "3"], stdout=out)
        created = await h.service.Create(request, None)
        assert created.pid == os.getpid()
        assert "prepare" in h.hypervisor.calls and "start" in h.hypervisor.calls
        assert isinstance(h.hypervisor.devices[0], BlockDevice)
        assert h.agent.sandbox_created
        async with trio.open_nursery() as readers:
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await read_fifo(out))

            readers.start_soon(reader)
            await h.service.Start(task_pb2.StartRequest(id="c1"), None)
            waited = await h.service.Wait(task_pb2.WaitRequest(id="c1"), None)
        assert waited.exit_status == 3
        assert got == [b"echo hi exit 3\n"]
        state = await h.service.State(task_pb2.StateRequest(id="c1"), None)
        assert state.status == 3  # STOPPED
        deleted = await h.service.Delete(task_pb2.DeleteRequest(id="c1"), None)
        assert deleted.exit_status == 3
        assert h.hypervisor.devices == []
        assert h.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        await h.service.Shutdown(task_pb2.ShutdownRequest(id="c1"), None)
        assert h.service.shutdown_requested.is_set()
        await h.service.teardown()
        assert "destroy" in h.hypervisor.calls
        assert not (tmp_path / "state" / "c1").exists()


async def test_stdin_eof_exec_pause_resume_kill(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        stdin, out = h.fifo("in"), h.fifo("out")
        await h.service.Create(h.create_request("c2", ["cat"], stdin=stdin, stdout=out), None)
        await h.service.Start(task_pb2.StartRequest(id="c2"), None)
        got: list[bytes] = []
        async with trio.open_nursery() as io:

            async def reader() -> None:
                got.append(await read_fifo(out))

            io.start_soon(reader)
            fd = await trio.to_thread.run_sync(os.open, stdin, os.O_WRONLY)
            os.write(fd, b"\x00\xffbinary")
            os.close(fd)
        assert got[0].startswith(b"cat\n")
        assert b"stdin:\x00\xffbinary" in got[0]
        assert "closestdin c2/" in h.agent.calls
        waited = await h.service.Wait(task_pb2.WaitRequest(id="c2"), None)
        assert waited.exit_status == 0

        # a second container of the same pod joins the running sandbox
        await h.service.Create(h.create_request("c3", ["sleep"], pod="c2"), None)
        assert h.hypervisor.calls.count("start") == 1
        await h.service.Start(task_pb2.StartRequest(id="c3"), None)
        spec = any_pb2.Any(type_url="p", value=b'{"args": ["ls", "/"], "cwd": "/"}')
        await h.service.Exec(task_pb2.ExecProcessRequest(id="c3", exec_id="e1", spec=spec), None)
        await h.service.Start(task_pb2.StartRequest(id="c3", exec_id="e1"), None)
        await h.service.Pause(task_pb2.PauseRequest(id="c3"), None)
        state = await h.service.State(task_pb2.StateRequest(id="c3"), None)
        assert state.status == 4  # PAUSED
        await h.service.Resume(task_pb2.ResumeRequest(id="c3"), None)
        await h.service.Kill(task_pb2.KillRequest(id="c3", signal=9), None)
        waited = await h.service.Wait(task_pb2.WaitRequest(id="c3"), None)
        assert waited.exit_status == 137
        topics = [t for t in h.topics() if t != "/tasks/exit"]
        assert topics[-6:] == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/paused",
            "/tasks/resumed",
        ]
        with pytest.raises(HuskError) as info:
            await h.service.Checkpoint(task_pb2.CheckpointTaskRequest(id="c3"), None)
        assert "checkpoint" in str(info.value)
        await h.service.teardown()
        nursery.cancel_scope.cancel()


async def test_boot_failure_is_reported_at_create_and_leaves_nothing(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)

        async def broken(spec: VmSpec) -> None:
            raise HuskError("qemu: kernel /nope not found")

        h.hypervisor.prepare = broken  # type: ignore[method-assign]
        with pytest.raises(HuskError, match="kernel /nope not found"):
            await h.service.Create(h.create_request("c4", ["true"]), None)
        await h.service.teardown()
        assert not (tmp_path / "state" / "c4").exists()


def test_event_envelope_names_the_message() -> None:
    event = events_pb2.TaskExit(container_id="c", id="c", exit_status=1)
    env = envelope("ns", event)
    assert env.topic == "/tasks/exit"
    assert env.namespace == "ns"
    assert env.event.type_url == "containerd.events.TaskExit"
    assert events_pb2.TaskExit.FromString(env.event.value) == event


# --- the pod network -----------------------------------------------------------------


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


async def test_pod_network_is_carried_into_the_guest(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        h.agent.nic_missing_for = 2
        netns = "/var/run/netns/pod1"
        await h.service.Create(h.create_request("n1", ["sleep"], netns=netns), None)
        assert h.netns_seen == [netns]
        nics = [d for d in h.hypervisor.devices if isinstance(d, NetDevice)]
        assert len(nics) == 1
        assert (nics[0].mac, nics[0].mtu, nics[0].tap_fds) == (
            "02:42:0a:00:00:02",
            1400,
            tuple(h.tap_fds),
        )
        assert all(_closed(fd) for fd in h.tap_fds)  # the VMM keeps its own copies
        assert h.agent.calls[:3] == [
            "interface eth0 02:42:0a:00:00:02",
            "routes 2",
            "neighbors 1",
        ]
        record = SandboxState.load(tmp_path / "state" / "n1")
        assert {(r.kind, r.path, r.name) for r in record.resources} >= {
            ("net-tap", netns, "tap0_husk"),
            ("net-ingress", netns, "eth0"),
        }
        await h.service.teardown()
        calls = h.hypervisor.calls
        assert calls.index(f"net-teardown {netns}") > calls.index("destroy")
        assert not (tmp_path / "state" / "n1").exists()
        nursery.cancel_scope.cancel()


async def test_without_a_netns_path_the_guest_has_only_loopback(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        await h.service.Create(h.create_request("n2", ["sleep"]), None)
        assert h.netns_seen == []
        assert not any(isinstance(d, NetDevice) for d in h.hypervisor.devices)
        assert not any(c.startswith(("interface", "routes")) for c in h.agent.calls)
        await h.service.teardown()
        assert not any(c.startswith("net-teardown") for c in h.hypervisor.calls)
        nursery.cancel_scope.cancel()


async def test_a_missing_netns_fails_the_start_before_any_vm(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        h.network_error = NetworkNotFoundError("network namespace /nope does not exist")
        with pytest.raises(NetworkNotFoundError, match=r"^network namespace /nope does not exist$"):
            await h.service.Create(h.create_request("n3", ["true"], netns="/nope"), None)
        await h.service.teardown()
        assert "start" not in h.hypervisor.calls
        assert not (tmp_path / "state" / "n3").exists()


async def test_a_guest_that_refuses_the_interface_fails_the_start_and_cleans_up(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        h = Harness(tmp_path, nursery)
        h.agent.interface_error = "ip link set dev eth1 mtu 1400 failed"
        with pytest.raises(HuskError) as info:
            await h.service.Create(h.create_request("n4", ["true"], netns="/run/netns/p"), None)
        message = str(info.value)
        assert "\n" not in message
        assert "eth0" in message and "/run/netns/p" in message, message
        await h.service.teardown()
        calls = h.hypervisor.calls
        assert calls.index("net-teardown /run/netns/p") > calls.index("destroy")
        assert not (tmp_path / "state" / "n4").exists()
