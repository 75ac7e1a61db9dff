"""AgentService's error paths, called directly and over husk's ttrpc on an in-memory stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent_proto import agent_pb2, health_pb2
from guest.agent import AgentConfig, AgentService, build_server
from guest.agent.container import Container
from guest.agent.network import Network
from guest.agent.process import Process, ProcessIO
from guest.agent.reaper import ExitWatch, Reaper
from guest.agent.sandbox import Sandbox
from guest.agent.storage import SysfsLayout
from shim.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from ttrpc.client import Client
from ttrpc.codes import Code
from ttrpc.errors import RpcError


def make_service(tmp_path: Path, *, host_mode: bool = True) -> AgentService:
    config = AgentConfig(
        state_dir=tmp_path / "state",
        shared_dir=tmp_path / "shared",
        runc_root=tmp_path / "state" / "runc",
        copy_file_root=tmp_path / "run",
        resolv_conf=tmp_path / "resolv.conf",
        host_mode=host_mode,
        sysfs=SysfsLayout(sys=tmp_path / "sys", dev=tmp_path / "dev"),
    )
    reaper = Reaper()
    return AgentService(Sandbox(config, reaper), Network())


def fake_container(service: AgentService, cid: str) -> Container:
    """A container record with no runc behind it, for lookup paths."""
    sandbox = service.sandbox
    init = Process(cid, cid, 999999, ProcessIO(f"init of {cid}", False), ExitWatch(999999), True)
    container = Container(sandbox.rt, cid, sandbox.config.bundle_dir(cid), init, [])
    sandbox.containers[cid] = container
    return container


async def test_container_calls_need_a_sandbox(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    request = agent_pb2.CreateContainerRequest(container_id="c1")
    with pytest.raises(FailedPreconditionError, match="CreateSandbox"):
        await service.CreateContainer(request, None)


async def test_sandbox_is_created_once(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    request = agent_pb2.CreateSandboxRequest(sandbox_id="sb", dns=["nameserver 10.0.0.1"])
    await service.CreateSandbox(request, None)
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    with pytest.raises(AlreadyExistsError, match="'sb'"):
        await service.CreateSandbox(request, None)


async def test_unknown_container_is_not_found_by_name(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    calls: list[tuple[Any, Any]] = [
        (service.StartContainer, agent_pb2.StartContainerRequest(container_id="ghost")),
        (service.WaitProcess, agent_pb2.WaitProcessRequest(container_id="ghost")),
        (service.ReadStdout, agent_pb2.ReadStreamRequest(container_id="ghost")),
        (service.SignalProcess, agent_pb2.SignalProcessRequest(container_id="ghost", signal=9)),
        (service.StatsContainer, agent_pb2.StatsContainerRequest(container_id="ghost")),
        (service.RemoveContainer, agent_pb2.RemoveContainerRequest(container_id="ghost")),
        (service.PauseContainer, agent_pb2.PauseContainerRequest(container_id="ghost")),
        (service.ExecProcess, agent_pb2.ExecProcessRequest(container_id="ghost", exec_id="e")),
    ]
    for handler, request in calls:
        with pytest.raises(NotFoundError, match="container 'ghost' not found"):
            await handler(request, None)


async def test_duplicate_container_and_bad_ids(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    await service.CreateSandbox(agent_pb2.CreateSandboxRequest(), None)
    fake_container(service, "c1")
    with pytest.raises(AlreadyExistsError, match="container 'c1' already exists"):
        await service.CreateContainer(agent_pb2.CreateContainerRequest(container_id="c1"), None)
    for bad in ("", "..", "a/b", "-x"):
        with pytest.raises(Exception, match="invalid") as err:
            await service.CreateContainer(agent_pb2.CreateContainerRequest(container_id=bad), None)
        assert getattr(err.value, "code", None) == Code.INVALID_ARGUMENT


async def test_unknown_exec_names_process_and_container(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    fake_container(service, "c1")
    request = agent_pb2.WaitProcessRequest(container_id="c1", exec_id="nope")
    with pytest.raises(NotFoundError, match="process 'nope' not found in container 'c1'"):
        await service.WaitProcess(request, None)


async def test_lifecycle_state_is_checked(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    fake_container(service, "c1")
    with pytest.raises(FailedPreconditionError, match="'c1' is created, not running"):
        await service.PauseContainer(agent_pb2.PauseContainerRequest(container_id="c1"), None)
    with pytest.raises(FailedPreconditionError, match="cannot exec 'e1'"):
        await service.ExecProcess(
            agent_pb2.ExecProcessRequest(
                container_id="c1", exec_id="e1", process={"Args": ["true"]}
            ),
            None,
        )


@asynccontextmanager
async def served(service: AgentService) -> AsyncIterator[tuple[Any, Any]]:
    server = build_server(service)
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        async with Client.open(client_side) as client:
            yield (
                client.stub(agent_pb2.DESCRIPTOR.services_by_name["AgentService"]),
                client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"]),
            )
        nursery.cancel_scope.cancel()


async def test_over_ttrpc_errors_become_statuses(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    async with served(service) as (agent, health):
        check = await health.Check(health_pb2.CheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        version = await health.Version(health_pb2.CheckRequest())
        assert version.agent_version.startswith("husk-agent ")
        with pytest.raises(RpcError) as err:
            await agent.StartContainer(agent_pb2.StartContainerRequest(container_id="ghost"))
        assert err.value.code == Code.NOT_FOUND
        assert "container 'ghost' not found" in str(err.value)
        with pytest.raises(RpcError) as err:
            await agent.AddSwap(agent_pb2.AddSwapRequest())
        assert err.value.code == Code.UNIMPLEMENTED
        assert "AddSwap" in str(err.value)
        with pytest.raises(RpcError) as err:
            await agent.UpdateInterface(agent_pb2.UpdateInterfaceRequest())
        assert err.value.code == Code.FAILED_PRECONDITION
        # The connection survives every error above.
        await agent.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="sb"))
        with pytest.raises(RpcError) as err:
            await agent.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="sb"))
        assert err.value.code == Code.ALREADY_EXISTS


async def test_over_ttrpc_copy_file_and_guest_details(tmp_path: Path) -> None:
    memory = tmp_path / "sys" / "devices" / "system" / "memory"
    memory.mkdir(parents=True)
    (memory / "block_size_bytes").write_text("8000000\n")
    service = make_service(tmp_path)
    async with served(service) as (agent, _):
        target = tmp_path / "run" / "sub" / "f.txt"

        def chunk(offset: int, data: bytes) -> agent_pb2.CopyFileRequest:
            return agent_pb2.CopyFileRequest(
                path=str(target), file_size=6, file_mode=0o640, uid=-1, gid=-1,
                offset=offset, data=data,
            )  # fmt: skip

        await agent.CopyFile(chunk(0, b"abc"))
        assert not target.exists()  # incomplete: still in its temp file
        await agent.CopyFile(chunk(3, b"def"))
        assert target.read_bytes() == b"abcdef"
        assert target.stat().st_mode & 0o777 == 0o640
        with pytest.raises(RpcError) as err:
            await agent.CopyFile(agent_pb2.CopyFileRequest(path="/etc/passwd", data=b"x"))
        assert err.value.code == Code.INVALID_ARGUMENT
        details = await agent.GetGuestDetails(
            agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
        )
        assert details.mem_block_size_bytes == 0x8000000
        assert details.support_mem_hotplug_probe is False
        assert "9p" in details.agent_details.storage_handlers


async def test_get_metrics_answers_the_guests_figures_and_the_client_times_it(
    tmp_path: Path,
) -> None:
    from shim.agent.client import AgentClient
    from shim.metrics.recorder import AGENT_RPC
    from shim.metrics.snapshot import guest_samples

    AGENT_RPC.clear()
    server = build_server(make_service(tmp_path))
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        async with AgentClient.open(client_side, request_timeout=10) as agent:
            text = await agent.get_metrics()
            await agent.check()
        nursery.cancel_scope.cancel()
    assert {s.family for s in guest_samples(text)} >= {"husk_guest_memory_bytes"}
    counted = {labels[0]: buckets[-1][1] for labels, buckets, _ in AGENT_RPC.cumulative()}
    assert counted == {"GetMetrics": 1.0, "Check": 1.0}


async def test_get_oom_event_waits_for_a_kill_in_a_watched_container(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    group = tmp_path / "cg" / "c1"
    group.mkdir(parents=True)
    (group / "memory.events").write_text("max 0\noom 0\noom_kill 0\n")
    service.sandbox.oom.watch("c1", group)
    events: list[agent_pb2.OOMEvent] = []

    async def wait_for_one(agent: Any) -> None:
        events.append(await agent.GetOOMEvent(agent_pb2.GetOOMEventRequest()))

    # One call waits throughout: a call abandoned by the client would leave its
    # handler waiting in the agent, and that handler could take the event.
    async with served(service) as (agent, _), trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_one, agent)
        await trio.sleep(0.1)
        assert events == []  # blocks while nothing happens
        (group / "memory.events").write_text("max 3\noom 1\noom_kill 1\n")
        service.sandbox.oom.check("c1")
        with trio.fail_after(5):
            while not events:
                await trio.sleep(0.01)
    assert [event.container_id for event in events] == ["c1"]


# --- ResetSandbox (husk's own): a pool VM's sandbox undone, the agent still serving --------


def reset_service(tmp_path: Path) -> AgentService:
    """A guest-mode service on temporary paths whose runtime logs its calls (and deletes
    a container's state as crun does, when told to).

    The cgroup hierarchy is a temporary v2 stand-in, so the reset's cgroup
    cleanup never touches the host's.
    """
    runtime = tmp_path / "crun"
    runtime.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n[ "$3" = delete ] && rm -rf "$2/$5"\nexit 0\n'
    )
    runtime.chmod(0o755)
    cgroup_root = tmp_path / "cgroup"
    (cgroup_root / "husk").mkdir(parents=True)  # as the runtime left it: empty
    (cgroup_root / "cgroup.controllers").write_text("memory pids\n")
    config = AgentConfig(
        state_dir=tmp_path / "state",
        shared_dir=tmp_path / "shared",
        runc=str(runtime),
        runc_root=tmp_path / "state" / "runc",
        cgroup_root=cgroup_root,
        copy_file_root=tmp_path / "run",
        resolv_conf=tmp_path / "resolv.conf",
        proc_sys=tmp_path / "proc-sys",
        sysfs=SysfsLayout(sys=tmp_path / "sys", dev=tmp_path / "dev"),
    )
    return AgentService(Sandbox(config, Reaper()), Network())


def exited_container(service: AgentService, cid: str) -> Container:
    """A container whose init has exited, with a bundle and crun's state on disk."""
    container = fake_container(service, cid)
    container.init.watch.set(0)
    container.bundle.mkdir(parents=True)
    (container.bundle / "config.json").write_text("{}")
    crun_state = service.sandbox.config.runc_root / cid
    crun_state.mkdir(parents=True)
    (crun_state / "status").write_text("{}")  # crun's; runc's would be state.json
    return container


async def test_reset_sandbox_lets_create_sandbox_run_again(tmp_path: Path) -> None:
    service = reset_service(tmp_path)
    sandbox = service.sandbox
    async with trio.open_nursery() as nursery:
        await nursery.start(sandbox.rt.reaper.run)
        await service.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="pool"), None)
        sysctls = sandbox.network_sysctls
        sysctls.applied = {}  # as after the throw-away container
        await service.ResetSandbox(agent_pb2.ResetSandboxRequest(), None)
        assert (sandbox.created, sandbox.id, sandbox.hostname) == (False, "", "")
        assert sandbox.network_sysctls is not sysctls
        assert sandbox.network_sysctls.applied is None
        assert not service.destroyed.is_set()  # the server keeps serving
        await service.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="pod"), None)
        assert (sandbox.created, sandbox.id) == (True, "pod")
        nursery.cancel_scope.cancel()


async def test_reset_sandbox_removes_containers_and_their_runtime_state(tmp_path: Path) -> None:
    service = reset_service(tmp_path)
    sandbox = service.sandbox
    config = sandbox.config
    async with trio.open_nursery() as nursery:
        await nursery.start(sandbox.rt.reaper.run)
        await service.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="pool"), None)
        exited_container(service, "c1")
        group = tmp_path / "memory-of-c1"
        group.mkdir()
        (group / "memory.events").write_text("oom_kill 0\n")
        sandbox.oom.watch("c1", group)
        (group / "memory.events").write_text("oom_kill 1\n")
        sandbox.oom.check("c1")  # an OOM event of the throw-away container, never read
        (group / "memory.events").unlink()
        stray = config.bundle_dir("failed")  # a bundle no container owns any more
        stray.mkdir(parents=True)
        orphan = config.runc_root / "failed"  # runtime state no container owns any more
        orphan.mkdir(parents=True)
        (orphan / "status").write_text("created")
        await service.ResetSandbox(agent_pb2.ResetSandboxRequest(), None)
        assert sandbox.containers == {}
        assert list((config.state_dir / "bundles").iterdir()) == []
        assert list(config.runc_root.iterdir()) == []
        assert not (config.cgroup_root / "husk").exists()
        runtime_calls = (tmp_path / "calls").read_text()
        assert sorted(runtime_calls.splitlines()) == [
            f"--root {config.runc_root} delete --force c1",
            f"--root {config.runc_root} delete --force failed",
        ]
        with trio.move_on_after(0.05) as nothing:
            await sandbox.oom.next_event()
        assert nothing.cancelled_caught  # the next sandbox hears nothing of this one
        with pytest.raises(NotFoundError, match="container 'c1' not found"):
            await service.StartContainer(agent_pb2.StartContainerRequest(container_id="c1"), None)
        nursery.cancel_scope.cancel()
    assert not service.destroyed.is_set()


async def test_reset_sandbox_over_ttrpc_keeps_the_server_serving(tmp_path: Path) -> None:
    from shim.agent.client import AgentClient

    service = reset_service(tmp_path)
    server = build_server(service)
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.sandbox.rt.reaper.run)
        nursery.start_soon(server.serve_stream, server_side)
        async with AgentClient.open(client_side, request_timeout=10) as agent:
            await agent.create_sandbox(agent_pb2.CreateSandboxRequest(sandbox_id="pool"))
            await agent.reset_sandbox()
            await agent.create_sandbox(agent_pb2.CreateSandboxRequest(sandbox_id="pod"))
            await agent.check()
        nursery.cancel_scope.cancel()
    assert service.sandbox.id == "pod"
    assert not service.destroyed.is_set()
