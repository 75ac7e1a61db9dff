"""A whole container life through the task service with the Cloud Hypervisor driver
underneath: the fake ``cloud-hypervisor`` process plays the VMM (every request held
to the API description), the task service's fake agent plays the guest. What the
sandbox engine asks of a plugin (boot, console, hot-plugged rootfs disk and NIC with
its tap fd, teardown) runs against the driver as it would on a KVM host."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from agent_proto import task_pb2
from plugins.cloud_hypervisor.driver import CloudHypervisor
from shim.host import HostFacts
from shim.hypervisor import VmSpec
from shim.sandbox.pod_network import SandboxNetwork
from shim.sandbox.sandbox import Sandbox
from shim.sandbox.state import SandboxState
from tests.unit.cloud_hypervisor.conftest import Vmm
from tests.unit.test_task_service import Harness


class ChHarness(Harness):
    """The task service's harness with a Cloud Hypervisor VM under each sandbox."""

    def __init__(
        self, tmp: Path, nursery: trio.Nursery, section: dict[str, Any], host: HostFacts
    ) -> None:
        super().__init__(tmp, nursery)
        self.section, self.host = section, host
        self.drivers: list[CloudHypervisor] = []
        self.sockets: list[socket.socket] = []

    def make_sandbox(
        self, sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]
    ) -> Sandbox:
        state = SandboxState.create(self.tmp / "state", sandbox_id)
        kernel = self.tmp / "vmlinux"
        kernel.write_bytes(b"\x7fELF")
        spec = VmSpec(sandbox_id, state.dir, 1, 256, kernel, None, record=state.record)
        driver = CloudHypervisor(self.section, host=self.host)
        self.drivers.append(driver)
        network = SandboxNetwork(
            netns,
            state,
            setup=self.setup_network,
            open_tap_fds=self.open_tap_fds,
            teardown=lambda plan: None,
        )
        return Sandbox(
            state,
            driver,
            spec,
            boot_timeout=10,
            dial_timeout=5,
            request_timeout=5,
            network=network,
            dial=self.dial,
        )

    def open_tap_fds(self, netns: str, tap: str, queues: int) -> list[int]:
        ours, theirs = socket.socketpair()  # one queue's fd, as a tap would give
        self.sockets.append(ours)
        return [theirs.detach()]  # the sandbox's network closes it once passed on


async def test_a_container_runs_start_to_delete_on_a_cloud_hypervisor_sandbox(
    workdir: Path, section: dict[str, Any], kvm: HostFacts, vmm: Vmm
) -> None:
    async with trio.open_nursery() as nursery:
        h = ChHarness(workdir, nursery, section, kvm)
        request = h.create_request("c1", ["echo", "hi", "exit", "3"], netns="/run/netns/pod")
        await h.service.Create(request, None)
        driver = h.drivers[0]
        pid = driver.vmm_pid()
        assert pid is not None
        await h.service.Start(task_pb2.StartRequest(id="c1"), None)
        waited = await h.service.Wait(task_pb2.WaitRequest(id="c1"), None)
        assert waited.exit_status == 3
        await h.service.Delete(task_pb2.DeleteRequest(id="c1"), None)
        await h.service.Shutdown(task_pb2.ShutdownRequest(id="c1"), None)
        await h.service.teardown()
    calls = [(r[1], r[4]) for r in vmm.requests() if r[1] != "vm.info"]
    assert calls[:3] == [("vmm.ping", 200), ("vm.create", 204), ("vm.boot", 204)]
    assert ("vm.add-net", 200) in calls and ("vm.add-disk", 200) in calls
    assert calls[-3:] == [("vm.shutdown", 204), ("vm.delete", 204), ("vmm.shutdown", 200)]
    add_net = next(r for r in vmm.requests() if r[1] == "vm.add-net")
    assert add_net[3] == 1  # the tap's fd went with the request
    assert not (workdir / "state" / "c1").exists()
    for sock in h.sockets:
        sock.close()
