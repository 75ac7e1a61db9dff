"""containerd 2's Sandbox service (``sandboxer = "shim"``) over a fake hypervisor and agent.

The harness is the task service's (:mod:`tests.unit.test_task_service`): a fake
VMM, a fake agent on in-memory streams, a planned pod network. The proof
with a real containerd 2.4, CRI and QEMU is tests/integration/test_cri_husk.py.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import any_pb2

from agent_proto import (
    agent_pb2,
    cgroups_v2_pb2,
    cri_pod_pb2,
    health_pb2,
    sandbox_pb2,
    task_pb2,
)
from shim.containerd.pod_config import POD_SANDBOX_CONFIG, pod_files, pod_settings
from shim.containerd.sandbox_service import NOT_READY, READY, SandboxService
from shim.containerd.serve import SANDBOX_SERVICE
from shim.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from shim.hypervisor import VmSize
from shim.sandbox import rootfs, sizing
from shim.sandbox.sandbox import Sandbox
from tests.unit.test_task_service import FakeAgent, Harness
from ttrpc import Server

POD = "pod1"
NETNS = "/run/netns/pod1"


@pytest.fixture(autouse=True)
def no_host_mounts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Bind mounts are shared into the guest by real mounts: here, only recorded."""
    shared: list[str] = []

    def share(container_id: str, spec: Any, *args: Any) -> None:
        shared.extend(f"{container_id} {m.destination}" for m in spec.Mounts)

    monkeypatch.setattr(rootfs, "share_bind_mounts", share)
    return shared


class PodAgent(FakeAgent):
    """The fake agent, also telling what CreateSandbox and each container's spec carried."""

    def __init__(self) -> None:
        super().__init__()
        self.hostname = ""
        self.sysctls: dict[str, dict[str, str]] = {}
        self.mounts: dict[str, list[tuple[str, str, list[str]]]] = {}

    async def CreateSandbox(self, request: agent_pb2.CreateSandboxRequest, ctx: Any) -> Any:
        self.hostname = request.hostname
        return await super().CreateSandbox(request, ctx)

    async def CreateContainer(self, request: agent_pb2.CreateContainerRequest, ctx: Any) -> Any:
        self.sysctls[request.container_id] = dict(request.OCI.Linux.Sysctl)
        self.mounts[request.container_id] = [
            (m.destination, m.source, list(m.options)) for m in request.OCI.Mounts
        ]
        return await super().CreateContainer(request, ctx)

    async def StatsContainer(
        self, request: agent_pb2.StatsContainerRequest, ctx: Any
    ) -> agent_pb2.StatsContainerResponse:
        response = agent_pb2.StatsContainerResponse()
        response.cgroup_stats.pids_stats.current = 2
        response.cgroup_stats.memory_stats.usage.usage = 1 << 20
        return response


class PodHarness(Harness):
    """The task service's harness with the Sandbox service over it."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        super().__init__(tmp, nursery)
        self.pod_agent = PodAgent()
        self.agent = self.pod_agent
        self.server = Server()
        self.server.register(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], self.agent)
        self.server.register(health_pb2.DESCRIPTOR.services_by_name["Health"], self.agent)
        self.sandboxes = SandboxService(nursery, self.service)

    def make_sandbox(
        self, sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]
    ) -> Sandbox:
        sandbox = super().make_sandbox(sandbox_id, netns, annotations)
        sandbox.resizer.sizing.maximum = VmSize(4, 1024)
        return sandbox

    async def create(self, config: cri_pod_pb2.PodSandboxConfig | None = None) -> None:
        options = any_pb2.Any()
        if config is not None:
            options = any_pb2.Any(type_url=POD_SANDBOX_CONFIG, value=config.SerializeToString())
        await self.sandboxes.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(
                sandbox_id=POD,
                bundle_path=str(self.tmp / "bundles" / POD),
                options=options,
                netns_path=NETNS,
            ),
            None,
        )

    async def start(self) -> sandbox_pb2.StartSandboxResponse:
        return await self.sandboxes.StartSandbox(
            sandbox_pb2.StartSandboxRequest(sandbox_id=POD), None
        )


async def test_create_sandbox_records_the_pod_and_boots_nothing(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        assert h.hypervisor.calls == [] and h.service.sandbox is None
        nursery.cancel_scope.cancel()


async def test_start_sandbox_boots_the_vm_on_the_pods_netns(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        started = await h.start()
        assert started.pid == os.getpid()
        assert started.created_at.seconds > 0
        assert h.hypervisor.calls.count("start") == 1
        assert h.netns_seen == [NETNS]
        assert "interface eth0 02:42:0a:00:00:02" in h.agent.calls
        assert h.pod_agent.hostname == POD
        await h.service.teardown()


async def test_pod_containers_run_in_the_sandbox_with_no_pause_container(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        await h.start()
        for cid in ("app1", "app2"):
            await h.service.Create(h.create_request(cid, ["sleep"], pod=POD), None)
            await h.service.Start(task_pb2.StartRequest(id=cid), None)
        assert h.hypervisor.calls.count("start") == 1
        created = [c.split()[1] for c in h.agent.calls if c.startswith("create ")]
        assert created == ["app1", "app2"]
        await h.service.teardown()


async def test_hostname_and_sysctls_come_from_the_pod_sandbox_config(tmp_path: Path) -> None:
    config = cri_pod_pb2.PodSandboxConfig(hostname="web-0")
    config.linux.sysctls["net.ipv4.ping_group_range"] = "0 2147483647"
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create(config)
        await h.start()
        for cid in ("app1", "app2"):
            await h.service.Create(h.create_request(cid, ["sleep"], pod=POD), None)
        assert h.pod_agent.hostname == "web-0"
        # the first container carries the pod's sysctls to the guest, which sets them once
        assert h.pod_agent.sysctls["app1"] == {"net.ipv4.ping_group_range": "0 2147483647"}
        assert h.pod_agent.sysctls["app2"] == {}
        await h.service.teardown()


async def test_the_pods_files_are_bound_read_only_into_each_container(tmp_path: Path) -> None:
    config = cri_pod_pb2.PodSandboxConfig(hostname="web-0")
    config.dns_config.servers.append("10.96.0.10")
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create(config)
        await h.start()
        for cid in ("app1", "app2"):
            await h.service.Create(h.create_request(cid, ["sleep"], pod=POD), None)
        files = tmp_path / "state" / POD / "pod-files"
        for cid in ("app1", "app2"):
            assert sorted(h.pod_agent.mounts[cid]) == [
                ("/etc/hostname", str(files / "etc_hostname"), ["rbind", "ro"]),
                ("/etc/hosts", str(files / "etc_hosts"), ["rbind", "ro"]),
                ("/etc/resolv.conf", str(files / "etc_resolv.conf"), ["rbind", "ro"]),
            ]
        assert (files / "etc_resolv.conf").read_text() == "nameserver 10.96.0.10\n"
        assert (files / "etc_hostname").read_text() == "web-0\n"
        await h.service.teardown()


async def test_pod_resources_reserve_room_in_the_vm_at_boot(tmp_path: Path) -> None:
    config = cri_pod_pb2.PodSandboxConfig()
    resources = config.linux.resources
    resources.cpu_quota, resources.cpu_period = 200_000, 100_000
    resources.memory_limit_in_bytes = 256 << 20
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create(config)
        await h.start()
        assert h.service.sandbox is not None
        assert h.service.sandbox.resizer.sizing.pod == VmSize(2, 256)
        assert h.service.sandbox.vm_spec.vcpus == 1 + 2
        await h.service.teardown()


async def test_stop_sandbox_destroys_the_vm_and_ends_wait(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        await h.start()
        waited: list[sandbox_pb2.WaitSandboxResponse] = []

        async def wait() -> None:
            waited.append(
                await h.sandboxes.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=POD), None)
            )

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert waited == []
        await h.sandboxes.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=POD), None)
        assert "destroy" in h.hypervisor.calls
        assert f"net-teardown {NETNS}" in h.hypervisor.calls
        assert not (tmp_path / "state" / POD).exists()
        await trio.testing.wait_all_tasks_blocked()
        assert waited[0].exit_status == 0 and waited[0].exited_at.seconds > 0
        status = await h.sandboxes.SandboxStatus(
            sandbox_pb2.SandboxStatusRequest(sandbox_id=POD), None
        )
        assert status.state == NOT_READY


async def test_a_vm_that_dies_ends_wait_with_status_137(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        await h.start()
        assert h.service.sandbox is not None
        h.service.sandbox._lose("the VMM exited")
        waited = await h.sandboxes.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=POD), None)
        assert waited.exit_status == 137


async def test_status_ping_and_platform_answer_for_a_running_sandbox(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        before = await h.sandboxes.SandboxStatus(
            sandbox_pb2.SandboxStatusRequest(sandbox_id=POD), None
        )
        assert before.state == NOT_READY
        await h.start()
        status = await h.sandboxes.SandboxStatus(
            sandbox_pb2.SandboxStatusRequest(sandbox_id=POD, verbose=True), None
        )
        assert (status.sandbox_id, status.pid, status.state) == (POD, os.getpid(), READY)
        assert status.info["hypervisor"] == "fake" and status.created_at.seconds > 0
        await h.sandboxes.PingSandbox(sandbox_pb2.PingRequest(sandbox_id=POD), None)
        answer = await h.sandboxes.Platform(sandbox_pb2.PlatformRequest(sandbox_id=POD), None)
        assert answer.platform.os == "linux"
        assert answer.platform.architecture == {"x86_64": "amd64"}.get(
            platform.machine(), answer.platform.architecture
        )
        await h.service.teardown()


async def test_sandbox_metrics_sum_the_pods_containers(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        await h.start()
        for cid in ("app1", "app2"):
            await h.service.Create(h.create_request(cid, ["sleep"], pod=POD), None)
        answer = await h.sandboxes.SandboxMetrics(
            sandbox_pb2.SandboxMetricsRequest(sandbox_id=POD), None
        )
        assert answer.metrics.id == POD
        assert answer.metrics.data.type_url == "io.containerd.cgroups.v2.Metrics"
        figures = cgroups_v2_pb2.Metrics.FromString(answer.metrics.data.value)
        assert figures.pids.current == 4 and figures.memory.usage == 2 << 20
        await h.service.teardown()


async def test_shutdown_sandbox_asks_the_shim_to_exit(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        await h.sandboxes.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=POD), None)
        assert h.service.shutdown_requested.is_set()
        waited = await h.sandboxes.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=POD), None)
        assert waited.exit_status == 0


async def test_the_last_tasks_delete_does_not_end_a_sandboxer_shim(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        await h.create()
        await h.start()
        await h.service.Create(h.create_request("app1", ["exit", "0"], pod=POD), None)
        await h.service.Start(task_pb2.StartRequest(id="app1"), None)
        await h.service.Wait(task_pb2.WaitRequest(id="app1"), None)
        await h.service.Delete(task_pb2.DeleteRequest(id="app1"), None)
        # containerd 2 follows every task's Delete with Shutdown
        await h.service.Shutdown(task_pb2.ShutdownRequest(id="app1"), None)
        assert not h.service.shutdown_requested.is_set()
        await h.sandboxes.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=POD), None)
        assert h.service.shutdown_requested.is_set()
        await h.service.teardown()


async def test_another_sandbox_id_is_not_found(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        with pytest.raises(NotFoundError, match="created none"):
            await h.sandboxes.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=POD), None)
        await h.create()
        with pytest.raises(NotFoundError, match=f"serves sandbox {POD}"):
            await h.sandboxes.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id="pod2"), None)
        with pytest.raises(AlreadyExistsError):
            await h.create()
        nursery.cancel_scope.cancel()


async def test_a_pod_config_that_does_not_decode_fails_create_in_one_line(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        h = PodHarness(tmp_path, nursery)
        bad = any_pb2.Any(type_url=POD_SANDBOX_CONFIG, value=b"\x12\xff")
        with pytest.raises(InvalidArgumentError) as caught:
            await h.sandboxes.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(sandbox_id=POD, options=bad), None
            )
        assert f"sandbox {POD}: options" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert h.service.sandbox is None
        nursery.cancel_scope.cancel()


def test_pod_settings_keep_husks_pod_annotations_only() -> None:
    config = cri_pod_pb2.PodSandboxConfig()
    config.annotations["io.husk.config.hypervisor.default_vcpus"] = "2"
    config.annotations["example.com/owner"] = "me"
    options = any_pb2.Any(type_url=POD_SANDBOX_CONFIG, value=config.SerializeToString())
    settings = pod_settings(POD, options, {"io.kubernetes.cri.sandbox-memory": "0"})
    assert dict(settings.annotations) == {
        "io.husk.config.hypervisor.default_vcpus": "2",
        "io.kubernetes.cri.sandbox-memory": "0",
    }


def test_pod_settings_without_cri_options_take_the_request_annotations() -> None:
    other = any_pb2.Any(type_url="example.Other", value=b"\x01")
    settings = pod_settings(POD, other, {sizing.SANDBOX_MEMORY: str(64 << 20)})
    assert settings.hostname == "" and dict(settings.sysctls) == {}
    assert dict(settings.annotations) == {sizing.SANDBOX_MEMORY: str(64 << 20)}


def test_the_pods_dns_config_makes_its_resolv_conf_as_the_cri_does() -> None:
    config = cri_pod_pb2.PodSandboxConfig(hostname="web-0")
    config.dns_config.servers.extend(["10.96.0.10", "10.96.0.11"])
    config.dns_config.searches.extend(["default.svc.cluster.local", "svc.cluster.local"])
    config.dns_config.options.append("ndots:5")
    files = pod_files(config)
    assert files["/etc/resolv.conf"] == (
        "search default.svc.cluster.local svc.cluster.local\n"
        "nameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n"
    )
    assert files["/etc/hostname"] == "web-0\n"


def test_a_pod_without_dns_config_or_hostname_gets_the_hosts() -> None:
    files = pod_files(cri_pod_pb2.PodSandboxConfig())
    assert files["/etc/hostname"] == socket.gethostname() + "\n"
    assert files["/etc/resolv.conf"] == Path("/etc/resolv.conf").read_text()
    assert files["/etc/hosts"] == Path("/etc/hosts").read_text()


def test_the_shim_serves_every_rpc_of_upstreams_sandbox_service() -> None:
    assert SANDBOX_SERVICE.full_name == "containerd.runtime.sandbox.v1.Sandbox"
    names = [m.name for m in SANDBOX_SERVICE.methods]
    assert names == [
        "CreateSandbox",
        "StartSandbox",
        "Platform",
        "StopSandbox",
        "WaitSandbox",
        "SandboxStatus",
        "PingSandbox",
        "ShutdownSandbox",
        "SandboxMetrics",
    ]
    registered = Server().register(SANDBOX_SERVICE, SandboxService(None, None))  # type: ignore[arg-type]
    assert sorted(registered) == sorted(names)


def test_messages_keep_upstreams_field_numbers() -> None:
    def numbers(message: Any) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(sandbox_pb2.CreateSandboxRequest) == {
        "sandbox_id": 1,
        "bundle_path": 2,
        "rootfs": 3,
        "options": 4,
        "netns_path": 5,
        "annotations": 6,
    }
    assert numbers(sandbox_pb2.StartSandboxResponse) == {"pid": 1, "created_at": 2, "spec": 3}
    assert numbers(sandbox_pb2.StopSandboxRequest) == {"sandbox_id": 1, "timeout_secs": 2}
    assert numbers(sandbox_pb2.WaitSandboxResponse) == {"exit_status": 1, "exited_at": 2}
    assert numbers(sandbox_pb2.SandboxStatusResponse) == {
        "sandbox_id": 1,
        "pid": 2,
        "state": 3,
        "info": 4,
        "created_at": 5,
        "exited_at": 6,
        "extra": 7,
    }
    assert numbers(sandbox_pb2.Metric) == {"timestamp": 1, "id": 2, "data": 3}
    assert numbers(cri_pod_pb2.PodSandboxConfig)["linux"] == 8
    assert numbers(cri_pod_pb2.LinuxPodSandboxConfig)["sysctls"] == 3
