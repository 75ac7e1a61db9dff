"""VM sizing, Update, metrics and a lost VM, through the task service over fakes.

The fakes are test_task_service's, with a hypervisor that can resize (and
records every resize and boot size) and an agent that records OnlineCPUMem,
UpdateContainer and answers StatsContainer. The real VM is proven in
tests/integration/test_resources.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from google.protobuf import any_pb2, empty_pb2

from agent_proto import agent_pb2, cgroups_v2_pb2, health_pb2, task_pb2
from shim.containerd import metrics
from shim.errors import InvalidArgumentError, NotFoundError
from shim.hypervisor import Capabilities, VmSize, VmSpec
from shim.sandbox import sizing
from shim.sandbox.pod_network import SandboxNetwork
from shim.sandbox.sandbox import Sandbox
from shim.sandbox.sizing import VmSizing
from shim.sandbox.state import SandboxState
from tests.unit.test_task_service import FakeAgent, FakeHypervisor, Harness
from ttrpc import Server

GIB = 1 << 30
MIB = 1 << 20
LIMITS = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
Empty = empty_pb2.Empty


class SizedHypervisor(FakeHypervisor):
    """Boots at the spec's size and resizes like QEMU under TCG: no vCPU unplug."""

    def __init__(self) -> None:
        super().__init__()
        self.size_now = VmSize(0, 0)
        self.exited = trio.Event()
        self.spec: VmSpec | None = None

    def capabilities(self) -> Capabilities:
        return Capabilities(
            block_hotplug=True,
            net_hotplug=True,
            virtio_serial=True,
            cpu_hotplug=True,
            memory_hotplug=True,
            memory_unplug=True,
        )

    async def prepare(self, spec: VmSpec) -> None:
        self.spec = spec
        self.size_now = VmSize(spec.vcpus, spec.memory_mib)
        self.calls.append(
            f"boot {spec.vcpus} {spec.memory_mib} max {spec.max_vcpus} {spec.max_memory_mib}"
        )

    async def resize(self, vcpus: int, memory_mib: int) -> VmSize:
        assert self.spec is not None
        assert vcpus >= self.size_now.vcpus, "vCPU unplug is not supported"
        self.size_now = VmSize(vcpus, max(memory_mib, self.spec.memory_mib))
        self.calls.append(f"resize {self.size_now.vcpus} {self.size_now.memory_mib}")
        return self.size_now

    async def size(self) -> VmSize:
        return self.size_now

    async def wait(self) -> int | None:
        await self.exited.wait()
        return -9


class SizedAgent(FakeAgent):
    def __init__(self) -> None:
        super().__init__()
        self.hang = False

    async def OnlineCPUMem(self, request: agent_pb2.OnlineCPUMemRequest, ctx: Any) -> Empty:
        self.calls.append(f"online {request.nb_cpus} cpu_only={request.cpu_only}")
        return Empty()

    async def UpdateContainer(self, request: agent_pb2.UpdateContainerRequest, ctx: Any) -> Empty:
        memory = request.resources.Memory.Limit
        self.calls.append(
            f"update {request.container_id} mem={memory} quota={request.resources.CPU.Quota}"
        )
        return Empty()

    async def StatsContainer(
        self, request: agent_pb2.StatsContainerRequest, ctx: Any
    ) -> agent_pb2.StatsContainerResponse:
        response = agent_pb2.StatsContainerResponse()
        stats = response.cgroup_stats
        stats.cpu_stats.cpu_usage.total_usage = 3_000_000
        stats.cpu_stats.cpu_usage.usage_in_usermode = 2_000_000
        stats.memory_stats.usage.usage = 50 * MIB
        stats.memory_stats.stats.update({"anon": 40 * MIB, "file": 8 * MIB, "pgfault": 7})
        stats.pids_stats.current = 2
        return response

    async def Check(self, request: Any, ctx: Any) -> Any:
        if self.hang:
            await trio.sleep_forever()
        return await super().Check(request, ctx)


class SizedHarness(Harness):
    """Maxima 4 vCPUs / 4096 MiB over defaults 1 / 128; resources per bundle."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        super().__init__(tmp, nursery)
        self.hypervisor = SizedHypervisor()
        self.agent = SizedAgent()
        self.server = Server()
        self.server.register(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], self.agent)
        self.server.register(health_pb2.DESCRIPTOR.services_by_name["Health"], self.agent)
        self.resources: dict[str, dict[str, Any]] = {}
        self.liveness = 10.0

    def make_sandbox(
        self, sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]
    ) -> Sandbox:
        state = SandboxState.create(self.tmp / "state", sandbox_id)
        spec = VmSpec(
            sandbox_id, state.dir, 1, 128, Path("/k"), None, max_vcpus=4, max_memory_mib=4096
        )
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
            request_timeout=0.5,
            network=network,
            dial=self.dial,
            liveness_interval=self.liveness,
        )

    def bundle(
        self,
        cid: str,
        args: list[str],
        annotations: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> str:
        path = super().bundle(cid, args, annotations, netns)
        config = Path(path) / "config.json"
        spec = json.loads(config.read_text())
        spec["linux"]["resources"] = self.resources.get(cid, {})
        config.write_text(json.dumps(spec))
        return path

    async def create(self, cid: str, resources: dict[str, Any], **kw: Any) -> None:
        self.resources[cid] = resources
        await self.service.Create(self.create_request(cid, ["sleep"], **kw), None)
        await self.service.Start(task_pb2.StartRequest(id=cid), None)

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        packed = any_pb2.Any(type_url=LIMITS, value=json.dumps(resources).encode())
        await self.service.Update(task_pb2.UpdateTaskRequest(id=cid, resources=packed), None)

    def sizes(self) -> list[str]:
        return [c for c in self.hypervisor.calls if c.startswith(("boot", "resize"))]


def cpus(n: float) -> dict[str, Any]:
    return {"cpu": {"quota": int(n * 100_000), "period": 100_000}}


def memory(limit: int) -> dict[str, Any]:
    return {"memory": {"limit": limit}}


# --- the rule ------------------------------------------------------------------------


def test_kata_rule_rounds_quota_up_to_whole_vcpus_and_bytes_up_to_mib() -> None:
    assert sizing.vcpus_for(150_000, 100_000) == 2
    assert sizing.vcpus_for(50_000, 0) == 1  # no period: the default 100 ms
    assert sizing.vcpus_for(-1, 100_000) == sizing.vcpus_for(0, 0) == 0
    assert sizing.mib_for(GIB + 1) == 1025 and sizing.mib_for(-1) == 0


def test_the_pod_total_is_reserved_and_its_containers_count_against_it() -> None:
    plan = VmSizing("pod", VmSize(1, 512), VmSize(8, 8192), "[hypervisor.qemu]")
    plan.pod = sizing.pod_reservation(
        {sizing.SANDBOX_CPU_QUOTA: "200000", sizing.SANDBOX_CPU_PERIOD: "100000",
         sizing.SANDBOX_MEMORY: str(GIB)}, "pod",
    )  # fmt: skip
    assert plan.wanted() == VmSize(3, 1536)
    plan.claims["a"] = VmSize(1, 256)
    assert plan.wanted() == VmSize(3, 1536)  # within what the pod declared
    plan.claims["b"] = VmSize(2, 2048)
    assert plan.wanted() == VmSize(4, 2816)


def test_bad_sandbox_annotations_are_one_line() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        sizing.pod_reservation({sizing.SANDBOX_MEMORY: "lots"}, "container p")
    assert str(err.value) == (
        "container p: annotation io.kubernetes.cri.sandbox-memory='lots' is not an integer"
    )


# --- through the task service ----------------------------------------------------------


async def test_the_vm_boots_with_room_for_the_container_that_starts_it(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("c1", {**cpus(2), **memory(GIB)})
        assert h.sizes() == ["boot 3 1152 max 4 4096"]
        await h.service.teardown()


async def test_a_pod_container_grows_the_vm_then_gets_its_cgroup(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("pod", {}, stdin="")
        await h.create("app", {**cpus(1.5), **memory(512 * MIB)}, pod="pod")
        assert h.sizes() == ["boot 1 128 max 4 4096", "resize 3 640"]
        assert "online 3 cpu_only=False" in h.agent.calls
        await h.service.teardown()


async def test_update_grows_the_vm_before_the_guest_cgroup(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("c1", memory(256 * MIB))
        await h.update("c1", {**memory(GIB), **cpus(2)})
        calls = [c for c in h.hypervisor.calls + h.agent.calls if "resize" in c or "update" in c]
        assert h.sizes()[-1] == "resize 3 1152"
        order = [c for c in h.agent.calls if c.startswith(("online", "update"))]
        assert order == ["online 3 cpu_only=False", f"update c1 mem={GIB} quota=200000"], calls
        await h.service.teardown()


async def test_a_lower_limit_gives_memory_back_and_keeps_the_vcpus(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("c1", {})
        await h.update("c1", {**memory(GIB), **cpus(2)})
        await h.update("c1", {**memory(256 * MIB), **cpus(1)})
        await trio.testing.wait_all_tasks_blocked()
        assert h.sizes()[-2:] == ["resize 3 1152", "resize 3 384"]
        await h.service.teardown()


async def test_removing_a_container_gives_its_memory_back(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("pod", {})
        await h.create("app", memory(GIB), pod="pod")
        await h.service.Kill(task_pb2.KillRequest(id="app", signal=9), None)
        await h.service.Wait(task_pb2.WaitRequest(id="app"), None)
        await h.service.Delete(task_pb2.DeleteRequest(id="app"), None)
        await trio.testing.wait_all_tasks_blocked()
        assert h.sizes()[-2:] == ["resize 1 1152", "resize 1 128"]
        await h.service.teardown()


@pytest.mark.parametrize(
    ("resources", "error", "message"),
    [
        (memory(5 * GIB), InvalidArgumentError,
         "sandbox c1: update of container c1 needs a VM of 5248 MiB (default_memory plus the "
         "containers' limits), above default_maxmemory = 4096 in [hypervisor.fake]"),
        (cpus(8), InvalidArgumentError,
         "sandbox c1: update of container c1 needs a VM of 9 vCPUs (default_vcpus plus the "
         "containers' limits), above default_maxvcpus = 4 in [hypervisor.fake]"),
        (memory(-5), InvalidArgumentError,
         "update of container c1: memory limit -5 is invalid: use -1 for no limit or a size "
         "in bytes"),
        ({"cpu": {"quota": 10, "period": 100_000}}, InvalidArgumentError,
         "update of container c1: cpu quota 10 is invalid: use -1 for no limit or at least "
         "1000 µs"),
        (memory(1 << 62), InvalidArgumentError, "above default_maxmemory = 4096"),
    ],
)  # fmt: skip
async def test_bad_or_too_large_updates_fail_in_one_line_and_change_nothing(
    tmp_path: Path, resources: dict[str, Any], error: type[Exception], message: str
) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("c1", memory(256 * MIB))
        before = (list(h.hypervisor.calls), list(h.agent.calls))
        with pytest.raises(error) as err:
            await h.update("c1", resources)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert (h.hypervisor.calls, h.agent.calls) == before
        await h.service.teardown()


async def test_update_of_an_unknown_container_is_not_found(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("c1", {})
        with pytest.raises(NotFoundError, match=r"^container ghost not found in sandbox c1$"):
            await h.update("ghost", memory(GIB))
        await h.service.teardown()


async def test_a_container_above_the_maximum_fails_and_leaves_nothing(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        h.resources["big"] = memory(8 * GIB)
        with pytest.raises(InvalidArgumentError) as err:
            await h.service.Create(h.create_request("big", ["true"]), None)
        assert str(err.value) == (
            "sandbox big: container big needs a VM of 8320 MiB (default_memory plus the "
            "containers' limits), above default_maxmemory = 4096 in [hypervisor.fake]"
        )
        assert "start" not in h.hypervisor.calls
        await h.service.teardown()
        assert not any((tmp_path / "state").iterdir())


async def test_a_negative_limit_fails_before_any_sandbox_is_made(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        h.resources["neg"] = memory(-7)
        with pytest.raises(InvalidArgumentError, match=r"^container neg: memory limit -7 is inv"):
            await h.service.Create(h.create_request("neg", ["true"]), None)
        assert h.service.sandbox is None and not (tmp_path / "state").exists()


async def test_stats_are_containerds_cgroups_v2_metrics(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("c1", {})
        reply = await h.service.Stats(task_pb2.StatsRequest(id="c1"), None)
        assert reply.stats.type_url == "io.containerd.cgroups.v2.Metrics"
        got = cgroups_v2_pb2.Metrics.FromString(reply.stats.value)
        assert (got.cpu.usage_usec, got.cpu.user_usec) == (3000, 2000)
        assert (got.memory.usage, got.memory.anon, got.memory.file) == (50 * MIB, 40 * MIB, 8 * MIB)
        assert got.memory.usage_limit == metrics.UNLIMITED  # the agent says 0 for "max"
        assert (got.pids.current, got.pids.limit) == (2, metrics.UNLIMITED)
        await h.service.teardown()


def test_metrics_always_carry_pids_cpu_and_memory() -> None:
    # ctr 1.6 prints their fields without checking for nil
    empty = metrics.from_agent(agent_pb2.StatsContainerResponse())
    assert empty.HasField("pids") and empty.HasField("cpu") and empty.HasField("memory")


def test_the_guests_memory_events_become_memory_events_and_the_cri_oom_counter() -> None:
    reply = agent_pb2.StatsContainerResponse()
    reply.cgroup_stats.memory_stats.events.update({"max": 7, "oom": 2, "oom_kill": 1})
    got = metrics.from_agent(reply).memory_events
    assert (got.low, got.max, got.oom, got.oom_kill) == (0, 7, 2, 1)


def test_no_memory_events_from_the_guest_leave_memory_events_unset() -> None:
    assert not metrics.from_agent(agent_pb2.StatsContainerResponse()).HasField("memory_events")


async def test_a_dead_vm_ends_every_task_with_137(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        await h.create("pod", {})
        await h.create("app", {}, pod="pod")
        h.hypervisor.exited.set()
        with trio.fail_after(5):
            for cid in ("pod", "app"):
                waited = await h.service.Wait(task_pb2.WaitRequest(id=cid), None)
                assert waited.exit_status == 137
        assert h.topics().count("/tasks/exit") == 2
        for cid in ("app", "pod"):
            state = await h.service.State(task_pb2.StateRequest(id=cid), None)
            assert state.status == 3  # STOPPED
            await h.service.Delete(task_pb2.DeleteRequest(id=cid), None)
        await h.service.teardown()
        assert not any((tmp_path / "state").iterdir())


async def test_an_agent_that_stops_answering_ends_every_task_with_137(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = SizedHarness(tmp_path, nursery)
        h.liveness = 0.1
        await h.create("c1", {})
        h.agent.hang = True
        with trio.fail_after(10):
            waited = await h.service.Wait(task_pb2.WaitRequest(id="c1"), None)
        assert waited.exit_status == 137
        assert h.service.sandbox is not None and "stopped answering" in str(h.service.sandbox.lost)
        await h.service.Delete(task_pb2.DeleteRequest(id="c1"), None)
        await h.service.teardown()
