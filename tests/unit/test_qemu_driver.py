"""QemuHypervisor against a fake ``qemu`` (a script on a temp path): start failures,
state, pause/resume and the stop escalation, without a real VM."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from plugins.qemu.driver import QemuHypervisor
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
    Recorder,
    SerialEndpoint,
    SharedFsDevice,
    VmSize,
    VmSpec,
    VmState,
    VsockDevice,
    record_nothing,
)
from shim.resources import Resource, process_alive

FAKE_QEMU = r"""
import json, os, signal, socket, sys, time
mode = os.environ.get("FAKE_QEMU_MODE", "ok")
if mode == "fail":
    sys.stderr.write("qemu-system-x86_64: warming up\n")
    sys.stderr.write("qemu-system-x86_64: -machine nope: unsupported machine type\n")
    sys.exit(1)
if mode == "hang":
    time.sleep(60)
    sys.exit(0)
qmp = next(a for a in sys.argv if a.startswith("socket,id=qmp,fd="))
fd = int(qmp.split("fd=")[1].split(",")[0])
listener = socket.socket(fileno=fd)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
status = "running"
# CPU slots as QEMU 7.2 lists them for -smp 1,maxcpus=3 (socket 0, cores 0-2), and
# a virtio-mem device that plugs whatever is requested (shrink: all but 4 MiB, as
# a guest that still uses some of it)
slots = [{"props": {"socket-id": 0, "core-id": c, "thread-id": 0}, "vcpus-count": 1,
          "type": "max-x86_64-cpu"} for c in (2, 1, 0)]
slots[2]["qom-path"] = "/machine/unattached/device[0]"
vmem = {"requested-size": 0, "size": 0}
MiB = 1 << 20
events = []
while True:
    conn, _ = listener.accept()
    f = conn.makefile("rwb", buffering=0)
    f.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
    for line in f:
        msg = json.loads(line)
        cmd, mid = msg["execute"], msg.get("id")
        reply = {"return": {}, "id": mid}
        if cmd == "query-status":
            reply["return"] = {"status": status, "running": status == "running"}
        elif cmd == "stop":
            status = "paused"
        elif cmd == "cont":
            status = "running"
        elif cmd == "query-hotpluggable-cpus":
            reply["return"] = slots
        elif cmd == "device_add" and msg["arguments"]["driver"].endswith("-cpu"):
            args = msg["arguments"]
            for slot in slots:
                if slot["props"]["core-id"] == args["core-id"]:
                    slot["qom-path"] = "/machine/peripheral/" + args["id"]
        elif cmd == "device_del":
            for slot in slots:
                if slot.get("qom-path") == "/machine/peripheral/" + msg["arguments"]["id"]:
                    del slot["qom-path"]
            events.append({"event": "DEVICE_DELETED", "data": {"device": msg["arguments"]["id"]},
                           "timestamp": {"seconds": 0, "microseconds": 0}})
        elif cmd == "qom-set":
            wanted = msg["arguments"]["value"]
            vmem["requested-size"] = wanted
            vmem["size"] = wanted if wanted >= vmem["size"] else wanted + 4 * MiB
        elif cmd == "qom-get":
            reply["return"] = vmem[msg["arguments"]["property"]]
        elif cmd == "quit" and mode == "ok":
            f.write((json.dumps(reply) + "\r\n").encode())
            sys.exit(0)
        f.write((json.dumps(reply) + "\r\n").encode())
        while events:
            f.write((json.dumps(events.pop(0)) + "\r\n").encode())
    conn.close()
"""

TCG_HOST = HostFacts(kvm_device=True, kvm_hardware=False, vhost_vsock=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short: unix socket paths must fit in 108 bytes
    path = Path(tempfile.mkdtemp(prefix="hq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_qemu(workdir: Path) -> Path:
    script = workdir / "qemu"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    (workdir / "vmlinuz").write_bytes(b"kernel")
    return script


def make(
    fake_qemu: Path,
    workdir: Path,
    record: Recorder = record_nothing,
    host: HostFacts = TCG_HOST,
    **section: object,
) -> tuple[QemuHypervisor, VmSpec]:
    values: dict[str, object] = {"path": str(fake_qemu), "stop_timeout": 0.3, **section}
    hv = QemuHypervisor(values, host)
    spec = VmSpec(
        sandbox_id="sb",
        state_dir=workdir / "sb",
        vcpus=1,
        memory_mib=128,
        kernel=workdir / "vmlinuz",
        initrd=None,
        record=record,
        max_vcpus=3,
        max_memory_mib=1152,
    )
    return hv, spec


async def test_every_file_is_recorded_before_it_exists(fake_qemu: Path, workdir: Path) -> None:
    existed: list[tuple[str, bool]] = []

    def record(resource: Resource) -> None:
        existed.append((resource.kind, Path(resource.path).exists() if resource.path else False))

    hv, spec = make(fake_qemu, workdir, record)
    await hv.prepare(spec)
    assert {kind for kind, _ in existed} == {"dir", "socket", "file"}
    assert not any(there for _, there in existed)


def test_capabilities_are_truthful() -> None:
    caps = QemuHypervisor({}, TCG_HOST).capabilities()
    assert caps.block_hotplug and caps.net_hotplug and caps.templates
    assert not caps.vsock and caps.virtio_serial
    assert caps.shared_fs == frozenset({"9p"})
    micro = QemuHypervisor({"machine_type": "microvm", "pcie_root_ports": 0}, TCG_HOST)
    assert not micro.capabilities().block_hotplug
    kvm_host = HostFacts(kvm_device=True, kvm_hardware=True, vhost_vsock=True)
    assert QemuHypervisor({}, kvm_host).capabilities().vsock
    tcg = QemuHypervisor({"accel": "tcg"}, TCG_HOST).capabilities()
    assert tcg.cpu_hotplug and tcg.memory_hotplug and tcg.memory_unplug
    assert not tcg.vcpu_unplug  # QEMU 7.2 under TCG crashes on the next add after an unplug
    assert QemuHypervisor({"accel": "kvm"}, kvm_host).capabilities().vcpu_unplug
    assert not micro.capabilities().cpu_hotplug and not micro.capabilities().memory_hotplug


async def test_qemu_failing_at_start_says_why_and_leaves_nothing(
    fake_qemu: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "fail")
    hv, spec = make(fake_qemu, workdir)
    await hv.prepare(spec)
    with pytest.raises(VmmExitedError) as info:
        await hv.start(5)
    assert info.value.returncode == 1
    assert str(info.value) == (
        "qemu exited with status 1: qemu-system-x86_64: warming up; "
        "qemu-system-x86_64: -machine nope: unsupported machine type"
    )
    assert "\n" not in str(info.value)
    assert not hv.paths.qmp.exists()
    assert await hv.state() == VmState.STOPPED
    await hv.destroy()
    assert not hv.paths.dir.exists()


async def test_qemu_that_never_answers_is_killed_at_the_deadline(
    fake_qemu: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    recorded: list[Resource] = []
    hv, spec = make(fake_qemu, workdir, recorded.append)
    await hv.prepare(spec)
    with pytest.raises(DeadlineExceededError, match=r"did not answer .* within 0.3 s"):
        await hv.start(0.3)
    assert [r.name for r in recorded if r.kind == "process"] == ["qemu"]
    assert await hv.state() == VmState.STOPPED
    await hv.destroy()
    assert not hv.paths.dir.exists()


async def test_missing_binary_and_kernel_fail_before_spawn(fake_qemu: Path, workdir: Path) -> None:
    hv, spec = make(workdir / "no-such-qemu", workdir)
    with pytest.raises(HostError, match=r"qemu binary .*no-such-qemu not found \(key 'path'"):
        await hv.prepare(spec)
    hv, spec = make(fake_qemu, workdir)
    bad = VmSpec("sb", spec.state_dir, 1, 128, workdir / "nokernel", None)
    with pytest.raises(HostError, match=r"guest kernel .*nokernel not found"):
        await hv.prepare(bad)
    assert not spec.state_dir.exists()


async def test_operations_before_prepare_or_start(fake_qemu: Path, workdir: Path) -> None:
    hv, spec = make(fake_qemu, workdir)
    with pytest.raises(FailedPreconditionError, match="prepare"):
        await hv.start(1)
    assert await hv.state() == VmState.NOT_STARTED
    await hv.prepare(spec)
    with pytest.raises(FailedPreconditionError, match="not started"):
        await hv.qmp("query-status")
    await hv.stop()  # nothing to stop
    await hv.destroy()


async def test_lifecycle_with_a_fake_qemu(fake_qemu: Path, workdir: Path) -> None:
    hv, spec = make(fake_qemu, workdir)
    await hv.prepare(spec)
    assert hv.agent_endpoint() == SerialEndpoint(spec.state_dir / "qemu" / "agent.sock")
    await hv.start(5)
    pid = hv.pid
    assert pid is not None and process_alive(pid)
    assert await hv.state() == VmState.RUNNING
    with pytest.raises(FailedPreconditionError, match="already running"):
        await hv.start(5)
    with pytest.raises(NotSupportedError, match="no /dev/vhost-vsock"):
        await hv.add_device(VsockDevice("vsock0", 3))
    with pytest.raises(NotSupportedError, match="QEMU cannot hot-add it"):
        await hv.add_device(SharedFsDevice("fs", "tag", workdir))
    with pytest.raises(FailedPreconditionError, match="not attached"):
        await hv.remove_device(BlockDevice("blk9", workdir / "x"))
    # the fake ignores system_powerdown and quits on "quit"
    await hv.stop()
    assert await hv.state() == VmState.STOPPED
    assert await hv.wait() == 0
    await hv.destroy()
    assert not hv.paths.dir.exists()


async def test_stop_escalates_to_sigkill(
    fake_qemu: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-term")  # ignores powerdown, quit and SIGTERM
    hv, spec = make(fake_qemu, workdir)
    await hv.prepare(spec)
    await hv.start(5)
    pid = hv.pid
    assert pid is not None
    await hv.stop()
    assert not process_alive(pid)
    assert await hv.wait() == -9
    await hv.destroy()


async def test_kill_9_wakes_waiters_and_state_says_stopped(fake_qemu: Path, workdir: Path) -> None:
    hv, spec = make(fake_qemu, workdir)
    await hv.prepare(spec)
    await hv.start(5)
    pid = hv.pid
    assert pid is not None
    statuses: list[int | None] = []

    async def waiter() -> None:
        statuses.append(await hv.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        os.kill(pid, 9)
    assert statuses == [-9, -9]
    assert await hv.state() == VmState.STOPPED
    with pytest.raises(VmmExitedError, match="qemu exited with status -9"):
        await hv.qmp("query-status")
    await hv.destroy()
    assert not hv.paths.dir.exists()


async def test_resize_hot_adds_vcpus_and_memory_and_gives_memory_back(
    fake_qemu: Path, workdir: Path
) -> None:
    hv, spec = make(fake_qemu, workdir, accel="tcg")
    await hv.prepare(spec)
    await hv.start(5)
    assert await hv.size() == VmSize(1, 128)
    # memory rounds up to whole 2 MiB virtio-mem blocks
    assert await hv.resize(3, 641) == VmSize(3, 642)
    assert await hv.size() == VmSize(3, 642)
    # the fake guest keeps 4 MiB it still uses: the result says what it kept
    assert await hv.resize(3, 128) == VmSize(3, 132)
    await hv.destroy()


async def test_resize_refuses_vcpu_unplug_under_tcg_and_sizes_above_the_room(
    fake_qemu: Path, workdir: Path
) -> None:
    hv, spec = make(fake_qemu, workdir, accel="tcg")
    await hv.prepare(spec)
    await hv.start(5)
    await hv.resize(2, 128)
    with pytest.raises(NotSupportedError, match="'qemu' does not support vCPU hot-unplug"):
        await hv.resize(1, 128)
    with pytest.raises(InvalidArgumentError, match="room for 3 vCPUs and 1152 MiB"):
        await hv.resize(4, 128)
    with pytest.raises(InvalidArgumentError, match="room for 3 vCPUs and 1152 MiB"):
        await hv.resize(1, 1154)
    assert await hv.size() == VmSize(2, 128)  # nothing changed
    await hv.destroy()


async def test_resize_unplugs_hot_added_vcpus_under_kvm(fake_qemu: Path, workdir: Path) -> None:
    kvm_host = HostFacts(kvm_device=True, kvm_hardware=True, vhost_vsock=False)
    hv, spec = make(fake_qemu, workdir, host=kvm_host, accel="kvm", cpu_model="host")
    await hv.prepare(spec)
    await hv.start(5)
    await hv.resize(3, 128)
    # below the boot size means "as small as possible": the boot vCPU stays
    assert await hv.resize(0, 0) == VmSize(1, 128)
    await hv.destroy()


async def test_a_vm_whose_state_dir_was_renamed_is_reached_at_the_new_paths(
    fake_qemu: Path, workdir: Path
) -> None:
    hv, spec = make(fake_qemu, workdir)
    await hv.prepare(spec)
    await hv.start(5)
    moved = spec.state_dir.with_name(spec.state_dir.name + "-moved")
    spec.state_dir.rename(moved)
    hv.relocate(dataclasses.replace(spec, state_dir=moved))
    assert hv.paths.qmp == moved / "qemu" / "qmp.sock"
    assert hv.agent_endpoint() == SerialEndpoint(moved / "qemu" / "agent.sock")
    assert await hv.state() == VmState.RUNNING  # QMP answers at the new path
    await hv.stop()
    await hv.destroy()
    assert not (moved / "qemu").exists()
