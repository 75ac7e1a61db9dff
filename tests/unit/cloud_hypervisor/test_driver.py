"""The Cloud Hypervisor driver's whole life against a fake ``cloud-hypervisor``: the
contract server in a process of its own, so spawning, waiting and killing are real.
Every request is held against the API description (``api.json``); the ``vmm``
fixture fails the test if one broke it."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from plugins.cloud_hypervisor.api import ApiClient
from plugins.cloud_hypervisor.driver import CloudHypervisor
from shim.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    HostError,
    InvalidArgumentError,
    NotSupportedError,
    VmmExitedError,
)
from shim.host import HostFacts
from shim.hypervisor import (
    BlockDevice,
    HybridVsockEndpoint,
    NetDevice,
    SharedFsDevice,
    TemplateFiles,
    VmSize,
    VmSpec,
    VmState,
    VsockDevice,
)
from shim.resources import PROCESS, process_alive
from tests.unit.cloud_hypervisor.conftest import Vmm

MIB = 1 << 20


async def started(driver: CloudHypervisor, spec: VmSpec) -> CloudHypervisor:
    await driver.prepare(spec)
    await driver.start(10.0)
    return driver


async def test_a_sandbox_vm_is_created_booted_and_stopped_through_the_api(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    assert await driver.state() == VmState.RUNNING
    pid = driver.vmm_pid()
    assert pid is not None
    await driver.destroy()
    assert vmm.endpoints() == [
        "vmm.ping",
        "vm.create",
        "vm.boot",
        "vm.info",
        "vm.info",
        "vm.shutdown",
        "vm.delete",
        "vmm.shutdown",
    ]
    assert not process_alive(pid)
    assert not spec.state_dir.joinpath("cloud-hypervisor").exists()
    processes = [r.name for r in vmm.resources if r.kind == PROCESS]
    assert processes == ["virtiofsd", "cloud-hypervisor"]


async def test_vm_create_carries_payload_sizes_console_vsock_and_the_share(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    body = vmm.body("vm.create")
    paths = driver.paths
    assert body["payload"]["kernel"] == str(spec.kernel)
    assert body["payload"]["initramfs"] == str(spec.initrd)
    assert body["payload"]["cmdline"].startswith("console=ttyS0 ")
    assert body["payload"]["cmdline"].endswith(" husk.debug=1")
    assert body["cpus"] == {"boot_vcpus": 1, "max_vcpus": 4}
    assert body["memory"] == {
        "size": 512 * MIB,
        "shared": True,
        "hotplug_size": 512 * MIB,
        "hotplug_method": "VirtioMem",
    }
    assert body["serial"] == {"mode": "Socket", "socket": str(paths.console)}
    assert body["vsock"] == {"cid": 3, "socket": str(paths.vsock)}
    assert body["fs"] == [
        {
            "id": "shared",
            "tag": "husk-shared",
            "socket": str(paths.virtiofs("shared")),
            "num_queues": 1,
            "queue_size": 1024,
        }
    ]
    secret = paths.agent_secret.read_bytes()
    assert body["platform"] == {"oem_strings": [f"io.husk.agent-secret={secret.hex()}"]}
    assert paths.agent_secret.stat().st_mode & 0o777 == 0o600
    assert secret.hex() not in " ".join(vmm.argv()) and secret.hex() not in str(body["payload"])
    assert driver.agent_endpoint() == HybridVsockEndpoint(paths.vsock, 1024, paths.agent_secret)
    assert driver.console_socket() == paths.console and paths.console.is_socket()
    assert vmm.argv()[:4] == ["--api-socket", f"path={paths.api}", "--event-monitor", vmm.argv()[3]]
    assert vmm.argv()[3].startswith("fd=")
    await driver.destroy()


async def test_boot_disks_are_in_vm_create_and_boot_nics_go_with_their_tap_fds(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, workdir: Path
) -> None:
    disk = workdir / "rootfs.img"
    disk.write_bytes(b"\0" * 4096)
    left, right = socket.socketpair()  # stands in for a tap's queue fd
    spec = _with(
        spec,
        devices=(
            BlockDevice("rootfs", disk, readonly=True, serial="husk0"),
            NetDevice("eth0", "02:00:00:00:00:01", tap_fds=(left.fileno(),), mtu=1450),
        ),
    )
    await started(driver, spec)
    assert vmm.body("vm.create")["disks"] == [
        {
            "id": "rootfs",
            "path": str(disk),
            "readonly": True,
            "image_type": "Raw",
            "serial": "husk0",
        }
    ]
    add_net = next(r for r in vmm.requests() if r[1] == "vm.add-net")
    assert add_net[2] == {"id": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1450, "num_queues": 2}
    assert (add_net[3], add_net[4]) == (1, 204)  # one fd received; cold-added before boot
    assert vmm.endpoints().index("vm.add-net") < vmm.endpoints().index("vm.boot")
    await driver.destroy()
    left.close()
    right.close()


async def test_disks_nics_and_shares_are_hot_plugged_and_removed(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, workdir: Path
) -> None:
    await started(driver, spec)
    disk = workdir / "volume.img"
    disk.write_bytes(b"\0" * 4096)
    (workdir / "extra").mkdir()
    left, right = socket.socketpair()
    devices = [
        BlockDevice("vol0", disk, format="qcow2"),
        NetDevice("eth1", "02:00:00:00:00:02", tap_fds=(left.fileno(),)),
        SharedFsDevice("extra", "extra-tag", workdir / "extra", kind="virtio-fs"),
    ]
    for device in devices:
        await driver.add_device(device)
    assert set(driver.bdf) == {"vol0", "eth1", "extra"}
    assert [r[4] for r in vmm.requests() if r[1].startswith("vm.add-")] == [200, 200, 200]
    assert driver.paths.virtiofs("extra").is_socket()  # its own virtiofsd serves the share
    for device in devices:
        await driver.remove_device(device)
    assert driver.bdf == {} and [d.id for d in driver.devices] == []
    assert not driver.paths.virtiofs("extra").exists()
    removed = [r[2]["id"] for r in vmm.requests() if r[1] == "vm.remove-device"]
    assert removed == ["vol0", "eth1", "extra"]
    await driver.destroy()
    left.close()
    right.close()


async def test_remove_returns_only_once_the_guest_has_ejected_the_device(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_EJECT_POLLS", "3")
    await started(driver, spec)
    disk = workdir / "volume.img"
    disk.write_bytes(b"\0" * 4096)
    await driver.add_device(BlockDevice("vol0", disk))
    await driver.remove_device(BlockDevice("vol0", disk))
    after = vmm.endpoints()[vmm.endpoints().index("vm.remove-device") + 1 :]
    assert after == ["vm.info"] * 4  # the device was in the tree three times, then gone
    await driver.destroy()


async def test_a_device_added_twice_or_removed_unknown_fails_before_the_api(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, workdir: Path
) -> None:
    await started(driver, spec)
    disk = workdir / "volume.img"
    disk.write_bytes(b"")
    await driver.add_device(BlockDevice("vol0", disk))
    with pytest.raises(FailedPreconditionError, match="device vol0 is already attached"):
        await driver.add_device(BlockDevice("vol0", disk))
    with pytest.raises(FailedPreconditionError, match="device nope is not attached"):
        await driver.remove_device(BlockDevice("nope", disk))
    with pytest.raises(NotSupportedError, match="hybrid-vsock socket"):
        await driver.add_device(VsockDevice("vsock1", 5))
    assert vmm.endpoints().count("vm.add-disk") == 1
    await driver.destroy()


async def test_a_hot_plug_cloud_hypervisor_refuses_is_one_line_with_its_messages(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, workdir: Path
) -> None:
    await started(driver, spec)
    with pytest.raises(Exception) as info:
        await driver.add_device(BlockDevice("vol0", workdir / "missing.img"))
    message = str(info.value)
    assert message.startswith("cloud-hypervisor: PUT vm.add-disk: 500 Internal Server Error: ")
    assert "Failed to open disk file" in message and "\n" not in message
    assert driver.devices == [] or all(d.id != "vol0" for d in driver.devices)
    await driver.destroy()


async def test_resize_grows_vcpus_and_memory_and_size_reads_them_back(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    assert await driver.size() == VmSize(1, 512)
    assert await driver.resize(3, 767) == VmSize(3, 768)  # virtio-mem plugs 2 MiB blocks
    assert vmm.body("vm.resize") == {"desired_vcpus": 3, "desired_ram": 768 * MIB}
    assert await driver.resize(1, 512) == VmSize(1, 512)  # and gives it back
    await driver.destroy()


async def test_resize_beyond_the_room_the_vm_booted_with_is_refused_without_a_request(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    with pytest.raises(InvalidArgumentError) as info:
        await driver.resize(5, 512)
    assert str(info.value) == (
        "cloud-hypervisor: sandbox sb1 cannot grow to 5 vCPUs and 512 MiB: its VM was "
        "started with room for 4 vCPUs and 1024 MiB"
    )
    assert "vm.resize" not in vmm.endpoints()
    await driver.destroy()


async def test_resize_waits_out_a_pending_vcpu_removal(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_BUSY_RESIZES", "2")
    await started(driver, spec)
    assert await driver.resize(2, 512) == VmSize(2, 512)
    statuses = [r[4] for r in vmm.requests() if r[1] == "vm.resize"]
    assert statuses == [429, 429, 204]
    await driver.destroy()


async def test_counters_come_from_vm_counters(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    assert await driver.counters() == {"shared": {"read_bytes": 0, "write_bytes": 0}}
    await driver.destroy()


async def test_state_follows_pause_and_resume(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    api = ApiClient(driver.paths.api, 5.0)
    await api.put("vm.pause")
    assert await driver.state() == VmState.PAUSED
    await api.put("vm.resume")
    assert await driver.state() == VmState.RUNNING
    await driver.destroy()
    assert await driver.state() == VmState.STOPPED


# --- the VM's end ----------------------------------------------------------------


async def test_wait_returns_the_status_when_the_vmm_is_killed(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    pid = driver.vmm_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(5):
        assert await driver.wait() == -signal.SIGKILL
    assert await driver.state() == VmState.STOPPED
    await driver.destroy()


async def test_a_guest_panic_reported_by_the_event_monitor_ends_the_vm(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    pid = driver.vmm_pid()
    assert pid is not None
    os.kill(pid, signal.SIGUSR1)  # the fake's "guest" panics; the VMM lives on
    with trio.fail_after(5):
        assert await driver.wait() is None
    assert driver.vmm_pid() == pid
    assert await driver.state() == VmState.STOPPED
    await driver.destroy()
    assert not process_alive(pid)


async def test_every_waiter_wakes_when_the_guest_is_lost(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    results: list[int | None] = []

    async def waiter() -> None:
        results.append(await driver.wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter)
            await trio.sleep(0.1)
            os.kill(driver.vmm_pid() or 0, signal.SIGUSR1)
    assert results == [None, None, None]
    await driver.destroy()


async def test_the_debug_console_is_a_vsock_port_of_its_own_only_when_asked(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await driver.prepare(spec)
    assert driver.debug_console_endpoint() is None
    await driver.prepare(_with(spec, debug_console=True))
    assert driver.debug_console_endpoint() == HybridVsockEndpoint(
        driver.paths.vsock, 1026, driver.paths.agent_secret
    )


async def test_stop_escalates_when_the_vmm_ignores_shutdown_and_sigterm(
    section: dict[str, Any], kvm: HostFacts, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_MODE", "ignore-term")
    driver = CloudHypervisor({**section, "stop_timeout": 0.5}, host=kvm)
    await started(driver, spec)
    pid = driver.vmm_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # answers nothing, dies only to SIGKILL
    with trio.fail_after(5):
        await driver.destroy()
    assert not process_alive(pid)
    assert vmm.endpoints()[-1] == "vm.boot"  # the stopped VMM never saw a request


# --- start failures: one line, nothing left behind ----------------------------------


def _leftovers(spec: VmSpec) -> list[str]:
    vm_dir = spec.state_dir / "cloud-hypervisor"
    return sorted(p.name for p in vm_dir.iterdir() if p.is_socket()) if vm_dir.exists() else []


async def test_a_vmm_that_exits_at_start_is_one_line_with_its_last_words(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_MODE", "exit")
    await driver.prepare(spec)
    with pytest.raises(VmmExitedError) as info:
        await driver.start(10.0)
    assert str(info.value) == (
        "cloud-hypervisor exited with status 1: cloud-hypervisor: starting; "
        "Error booting VM: Failed to open /dev/kvm: Permission denied"
    )
    assert _leftovers(spec) == []  # virtiofsd killed, its socket gone


async def test_an_api_socket_that_never_appears_times_out_and_the_vmm_is_killed(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_MODE", "no-socket")
    await driver.prepare(spec)
    with pytest.raises(DeadlineExceededError) as info:
        await driver.start(1.0)
    assert str(info.value) == (
        f"cloud-hypervisor did not create its API socket {driver.paths.api} within 1 s; "
        f"killed it (see {driver.paths.log})"
    )
    assert driver.vmm_pid() is None and _leftovers(spec) == []


async def test_a_vmm_that_never_answers_times_out_and_is_killed(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_MODE", "mute")
    await driver.prepare(spec)
    with pytest.raises(DeadlineExceededError, match="did not answer on its API socket"):
        await driver.start(3.0)
    assert driver.vmm_pid() is None and _leftovers(spec) == []


async def test_a_vmm_that_dies_during_boot_says_so(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_MODE", "die-on-boot")
    await driver.prepare(spec)
    with pytest.raises(VmmExitedError, match=r"^cloud-hypervisor exited with status 3"):
        await driver.start(10.0)
    assert _leftovers(spec) == []


async def test_a_request_without_an_answer_fails_at_its_deadline(
    section: dict[str, Any], kvm: HostFacts, spec: VmSpec, vmm: Vmm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_MODE", "hang:vm.counters")
    driver = CloudHypervisor({**section, "api_timeout": 0.5}, host=kvm)
    await started(driver, spec)
    with pytest.raises(DeadlineExceededError) as info:
        await driver.counters()
    assert str(info.value) == "cloud-hypervisor: GET vm.counters got no answer within 0.5 s"
    await driver.destroy()


async def test_a_vm_whose_vmm_is_gone_fails_the_next_call_with_its_exit(
    driver: CloudHypervisor, spec: VmSpec, vmm: Vmm
) -> None:
    await started(driver, spec)
    pid = driver.vmm_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(VmmExitedError, match="exited with status -9"):
        await driver.size()
    await driver.destroy()


# --- what the driver refuses before anything runs ----------------------------------


async def test_no_kvm_is_one_line_naming_it(
    section: dict[str, Any], spec: VmSpec, tcg_host: HostFacts
) -> None:
    driver = CloudHypervisor(section, host=tcg_host)
    with pytest.raises(HostError) as info:
        await driver.prepare(spec)
    assert str(info.value) == (
        "Cloud Hypervisor needs hardware KVM: /dev/kvm is there but the CPU reports no "
        "hardware virtualisation (vmx/svm)"
    )
    assert not spec.state_dir.exists()


async def test_a_missing_binary_is_one_line_naming_the_key(
    section: dict[str, Any], spec: VmSpec, kvm: HostFacts
) -> None:
    driver = CloudHypervisor({**section, "path": "/nonexistent/cloud-hypervisor"}, host=kvm)
    with pytest.raises(HostError) as info:
        await driver.prepare(spec)
    assert str(info.value) == (
        "cloud-hypervisor binary /nonexistent/cloud-hypervisor not found "
        "(key 'path' of [hypervisor.cloud-hypervisor])"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agent_transport": "virtio-serial"}, "agent transport virtio-serial"),
        ({"template": "clone"}, "VM templates"),
        ({"shared_fs": "9p"}, "a 9p share"),
    ],
)
async def test_what_cloud_hypervisor_cannot_do_is_refused_by_name(
    driver: CloudHypervisor, spec: VmSpec, change: dict[str, Any], message: str, workdir: Path
) -> None:
    if "template" in change:
        change = {"template": TemplateFiles(workdir / "m", workdir / "s")}
    if "shared_fs" in change:
        change = {"shared_fs": SharedFsDevice("shared", "t", workdir, kind="9p")}
    with pytest.raises(NotSupportedError) as info:
        await driver.prepare(_with(spec, **change))
    assert str(info.value).startswith(f"hypervisor 'cloud-hypervisor' does not support {message}")


def _with(spec: VmSpec, **changes: Any) -> VmSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)
