"""The QEMU plugin with real QEMU (TCG here) and the real guest image.

Each test boots one VM and runs several steps on it: a TCG boot costs
seconds, and a trio run (one per test) cannot share a process with the next.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from plugins.qemu.driver import QemuHypervisor
from shim.agent.client import AgentClient
from shim.agent.transport import connect
from shim.errors import HostError, VmmExitedError
from shim.host import HostFacts
from shim.hypervisor import CLONE, TEMPLATE, BlockDevice, NetDevice, TemplateFiles, VmSpec, VmState
from shim.resources import process_alive
from shim.sandbox.console import ConsoleLog
from shim.sandbox.rootfs import shared_fs_device
from ttrpc import DeadlineExceeded

pytestmark = pytest.mark.integration

IMAGE_DIR = Path("/var/lib/husk/images")
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
MARKER = "husk-init: "
AGENT_MARKER = "agent started"


@pytest.fixture(scope="session")
def image() -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (QEMU, taps)")
    if not Path(QEMU).exists():
        pytest.skip(f"{QEMU} not installed")
    kernel, initrd = IMAGE_DIR / "vmlinuz", IMAGE_DIR / "initrd.img"
    if not (kernel.exists() and initrd.exists()):
        from guest.image import build_image

        build_image(IMAGE_DIR)
    return kernel, initrd


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hqi", dir="/tmp"))  # short: socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def spec_for(workdir: Path, image: tuple[Path, Path], **kw: object) -> VmSpec:
    shared = workdir / "shared"
    shared.mkdir(exist_ok=True)
    values: dict[str, object] = {
        "sandbox_id": "it-" + workdir.name,
        "state_dir": workdir / "sb",
        "vcpus": 1,
        "memory_mib": 512,
        "kernel": image[0],
        "initrd": image[1],
        "shared_fs": shared_fs_device("9p", shared),
    }
    values.update(kw)
    return VmSpec(**values)  # type: ignore[arg-type]


def driver(**section: object) -> QemuHypervisor:
    values: dict[str, object] = {"path": QEMU, "accel": "tcg", "cpu_model": "max"}
    values.update({"stop_timeout": 3.0, **section})
    return QemuHypervisor(values, HostFacts.probe())


def console_log(hv: QemuHypervisor) -> Path:
    """Where ``tap_console`` keeps this VM's console: the test's dir, beside the state dir."""
    return hv.paths.dir.parent.parent / "console.log"


async def tap_console(hv: QemuHypervisor) -> None:
    """Keep the guest console in ``console_log(hv)``, across QEMU restarts (restore).

    The plugin exposes the console as a socket; the sandbox reads it into a
    bounded log, and a test without a sandbox does the same here.
    """
    console = ConsoleLog(console_log(hv))
    while True:
        socket_path = hv.console_socket()
        assert socket_path is not None
        await console.run(socket_path, connect_timeout=120)
        await trio.sleep(0.05)


async def wait_console(hv: QemuHypervisor, text: str, timeout: float = 60) -> float:
    started = time.monotonic()
    with trio.fail_after(timeout):
        while text not in _console(hv):
            await trio.sleep(0.05)
    return time.monotonic() - started


async def tap_until(hv: QemuHypervisor, text: str, timeout: float = 60) -> float:
    """Tap the console (with no tap of its own running) until ``text`` shows."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        elapsed = await wait_console(hv, text, timeout)
        nursery.cancel_scope.cancel()
    return elapsed


def _console(hv: QemuHypervisor) -> str:
    try:
        return console_log(hv).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def agent_answers(hv: QemuHypervisor, timeout: float) -> bool:
    """Whether the guest agent answers Health.Check within ``timeout``.

    Only timeouts are retried (a paused guest cannot answer; bytes sent before
    the guest opens its port at boot are lost). A new connection is a new
    session for the agent even when the guest never saw the previous one go
    (after a pause or a restore; see ``guest.agent.host_sessions``), so any
    other error fails.
    """
    with trio.move_on_after(timeout):
        while True:
            try:
                stream = await connect(hv.agent_endpoint(), timeout)
                async with AgentClient.open(stream) as agent:
                    await agent.check(timeout=2.0)
                    return True
            except DeadlineExceeded:
                await trio.sleep(0.2)
    return False


def qemu_pids(directory: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(directory)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@asynccontextmanager
async def running(hv: QemuHypervisor, spec: VmSpec, workdir: Path) -> AsyncIterator[QemuHypervisor]:
    """``hv`` prepared with ``spec`` and started, its console tapped; destroyed on
    the way out, and no QEMU of ``workdir`` left."""
    await hv.prepare(spec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        try:
            started = time.monotonic()
            await hv.start(30)
            print(f"boot to QMP: {time.monotonic() - started:.2f} s")
            yield hv
        finally:
            with trio.CancelScope(shield=True):
                await hv.destroy()
            nursery.cancel_scope.cancel()
    assert not qemu_pids(workdir)


@pytest.fixture
async def booted(workdir: Path, image: tuple[Path, Path]) -> AsyncIterator[QemuHypervisor]:
    async with running(driver(), spec_for(workdir, image), workdir) as hv:
        yield hv


async def test_boot_agent_stop_destroy(booted: QemuHypervisor, workdir: Path) -> None:
    hv = booted
    assert await hv.state() == VmState.RUNNING
    assert (await hv.qmp("query-status"))["status"] == "running"
    print(f"boot to console marker: {await wait_console(hv, AGENT_MARKER):.2f} s")
    assert await agent_answers(hv, 30)

    pid = hv.pid
    assert pid is not None
    await hv.stop()
    assert await hv.state() == VmState.STOPPED
    assert not process_alive(pid)
    await hv.destroy()
    assert not hv.paths.dir.exists()
    assert not qemu_pids(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["console.log", "sb", "shared"]
    assert list((workdir / "sb").iterdir()) == []


async def test_hotplug_disk_and_nic(booted: QemuHypervisor, workdir: Path) -> None:
    hv = booted
    await wait_console(hv, AGENT_MARKER)  # the guest's hot-plug driver is up
    disk_path = workdir / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk_path), "16M"], check=True)
    disk = BlockDevice("blk0", disk_path, serial="husktestdisk0")
    await hv.add_device(disk)
    blocks = await hv.qmp("query-block")
    assert any("/blk0/" in b.get("qdev", "") for b in blocks), blocks
    assert "blk0" in _pci_ids(await hv.qmp("query-pci"))
    assert hv.devices[-1].bus == "rp0"

    tap = "hqtap" + workdir.name[-6:]
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        nic = NetDevice("net0", "02:11:22:33:44:55", tap_name=tap)
        await hv.add_device(nic)
        pci = _pci_ids(await hv.qmp("query-pci"))
        assert "net0" in pci
        started = time.monotonic()
        await hv.remove_device(nic)
        print(f"NIC hot-remove: {time.monotonic() - started:.2f} s")
        assert "net0" not in _pci_ids(await hv.qmp("query-pci"))
    finally:
        subprocess.run(["ip", "link", "delete", tap], check=False)

    await hv.remove_device(disk)
    assert "blk0" not in _pci_ids(await hv.qmp("query-pci"))
    nodes = [n["node-name"] for n in await hv.qmp("query-named-block-nodes")]
    assert "drive-blk0" not in nodes
    await hv.add_device(disk)  # the root port and the node name are free again
    assert hv.devices[-1].bus == "rp0"


def _pci_ids(buses: list[dict[str, object]]) -> set[str]:
    found: set[str] = set()

    def walk(devices: object) -> None:
        for dev in devices if isinstance(devices, list) else []:
            if dev.get("qdev_id"):
                found.add(dev["qdev_id"])
            bridge = dev.get("pci_bridge") or {}
            walk(bridge.get("devices", []))

    for bus in buses:
        walk(bus["devices"])
    return found


async def test_a_template_saved_then_cloned_runs_on_then_kill_9_wakes_waiters(
    workdir: Path, image: tuple[Path, Path]
) -> None:
    template_dir = workdir / "tpl"
    template_dir.mkdir()
    files = TemplateFiles(template_dir / "memory", template_dir / "state", role=TEMPLATE)
    hv = driver()
    await hv.prepare(spec_for(workdir, image, template=files))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        try:
            await hv.start(30)
            await wait_console(hv, AGENT_MARKER)
            assert await agent_answers(hv, 30)
            await hv.save_template()
            assert await hv.state() == VmState.STOPPED
            assert files.state.stat().st_size < 2 << 20  # device state only: no RAM in it

            clone = dataclasses.replace(files, role=CLONE)
            await hv.prepare(spec_for(workdir, image, template=clone))
            started = time.monotonic()
            await hv.start(60)
            assert await agent_answers(hv, 30)
            print(f"clone to agent: {time.monotonic() - started:.2f} s")
            # not rebooted: a boot would have printed its init's line again first
            assert _console(hv).count("init started") == 1

            pid = hv.pid
            assert pid is not None
            woken: list[int | None] = []
            async with trio.open_nursery() as waiters:

                async def waiter() -> None:
                    woken.append(await hv.wait())

                waiters.start_soon(waiter)
                await trio.sleep(0.1)
                os.kill(pid, 9)
            assert woken == [-9]
            assert await hv.state() == VmState.STOPPED
        finally:
            with trio.CancelScope(shield=True):
                await hv.destroy()
            nursery.cancel_scope.cancel()


async def test_one_line_errors_and_nothing_left(workdir: Path, image: tuple[Path, Path]) -> None:
    hv = driver()
    with pytest.raises(HostError, match=r"guest kernel .* not found"):
        await hv.prepare(spec_for(workdir, image, kernel=workdir / "missing"))

    hv = driver(path=str(workdir / "no-qemu"))
    with pytest.raises(HostError, match=r"qemu binary .* not found"):
        await hv.prepare(spec_for(workdir, image))

    hv = driver(machine_type="pc-nonexistent")
    await hv.prepare(spec_for(workdir, image))
    with pytest.raises(VmmExitedError) as info:
        await hv.start(30)
    message = str(info.value)
    assert "\n" not in message
    assert "unsupported machine type" in message, message
    assert not qemu_pids(workdir)
    await hv.destroy()
    assert not (workdir / "sb" / "qemu").exists()


async def test_qemu_can_run_as_an_unprivileged_user_with_its_disks_passed_as_fds(
    workdir: Path, image: tuple[Path, Path]
) -> None:
    disk = workdir / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    disk.chmod(0o600)  # root's: QEMU, as nobody, could not open it by name
    hv = driver(run_as="nobody")
    await hv.prepare(spec_for(workdir, image, shared_fs=None))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        try:
            await hv.start(30)
            assert hv.pid is not None
            status = Path(f"/proc/{hv.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == ["65534"] * 4
            await wait_console(hv, AGENT_MARKER)
            assert await agent_answers(hv, 60)
            await hv.add_device(BlockDevice("blk0", disk, serial="husk-runas"))
            block = await hv.qmp("query-block")
            assert any("/blk0/" in b.get("qdev", "") for b in block), block
        finally:
            with trio.CancelScope(shield=True):
                await hv.destroy()
            nursery.cancel_scope.cancel()


async def test_a_vm_with_a_bounded_translation_cache_boots_and_answers(
    workdir: Path, image: tuple[Path, Path]
) -> None:
    hv = driver(tcg_tb_size=32)
    await hv.prepare(spec_for(workdir, image))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        try:
            await hv.start(30)
            assert hv.pid is not None
            argv = Path(f"/proc/{hv.pid}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"-accel") + 1] == b"tcg,tb-size=32"
            assert await agent_answers(hv, 60)
        finally:
            with trio.CancelScope(shield=True):
                await hv.destroy()
            nursery.cancel_scope.cancel()
