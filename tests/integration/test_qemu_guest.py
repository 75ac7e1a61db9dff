"""The QEMU plugin's hot-plug, seen from inside the guest.

``test_qemu_vm`` proves them over QMP; here the guest agent and its
containers are the witnesses. One VM (TCG, virtio-serial agent channel, 9p
share mounted by CreateSandbox) serves the module's tests, in order:

- a raw 64 MiB ext4 image is hot-added with a serial; a container with it as a
  ``blk`` storage sees a 64 MiB disk and writes a file; the container is
  removed (the agent unmounts), the disk hot-removed (gone from the guest's
  /sys/block, the file readable in the host's image), re-added, and a new
  container reads the file back;
- a NIC on a host tap is hot-added with a given MAC; the agent's
  ListInterfaces shows it; after hot-remove it is gone;
- a host that reconnects before the guest saw it leave is a new ttrpc
  session to the agent, not a stale one (``guest.agent.host_sessions``).

Saving and starting from a saved VM is the VM template's business: see
``test_qemu_vm`` (driver) and ``test_template`` (sandboxes).

The VM, its driver and the agent connection live on one trio loop in a
thread, so that they outlive each test (a trio run lasts one test).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent_proto import agent_pb2, health_pb2
from plugins.qemu.driver import QemuHypervisor
from shim.agent.transport import connect
from shim.cli.local_images import BUSYBOX, applets
from shim.hypervisor import BlockDevice, NetDevice
from shim.sandbox.rootfs import shared_fs_device, shared_storage
from tests.integration.test_agent_host import make_spec
from tests.integration.test_qemu_vm import (
    AGENT_MARKER,
    driver,
    image,
    qemu_pids,
    spec_for,
    tap_until,
)
from ttrpc import Client, Code, RpcError

__all__ = ["image"]  # a fixture, used by name

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0
DISK_MIB = 64
DISK_SERIAL = "huskguestdisk0"
DISK_MOUNT = "/run/husk-test/disk0"
NIC_MAC = "02:48:55:53:4b:01"
T = TypeVar("T")


class Loop:
    """A trio loop in a thread; ``run`` executes coroutines on it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``afn(*args, **kwargs)`` on the loop and return its result."""
        assert self._token is not None, "the loop is not running"
        if self._error is not None:
            raise RuntimeError("the loop died") from self._error
        return trio.from_thread.run(functools.partial(afn, *args, **kwargs),
                                    trio_token=self._token)  # fmt: skip

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        if self._error is not None:
            raise self._error


class Vm:
    """The booted VM, its driver, and one agent connection at a time."""

    def __init__(self, loop: Loop, hv: QemuHypervisor, shared: Path) -> None:
        self.loop = loop
        self.hv = hv
        self.shared = shared
        self.agent: Any = None
        self.health: Any = None
        self._drop: trio.Event | None = None
        self._dropped: trio.Event | None = None

    # -- the agent connection ----------------------------------------------------

    async def connect(self) -> None:
        """Open a new connection to the agent (closing the previous one).

        On virtio-serial, QEMU discards what the host sends while the guest's
        port is closed, and a guest that saw the last hang-up may still be
        reopening it: the first Health.Check is retried briefly, as the shim's
        ``wait_ready`` does. Every call after it must answer at once.
        """
        await self.disconnect()
        assert self.loop.nursery is not None
        await self.loop.nursery.start(self._hold_connection)
        with trio.fail_after(BOOT_TIMEOUT):
            while True:
                try:
                    await self.health.Check(health_pb2.CheckRequest(), timeout=0.5)
                    return
                except RpcError as e:
                    if e.code != Code.DEADLINE_EXCEEDED:
                        raise

    async def _hold_connection(self, task_status: trio.TaskStatus[None]) -> None:
        self._drop, self._dropped = trio.Event(), trio.Event()
        try:
            stream = await connect(self.hv.agent_endpoint(), BOOT_TIMEOUT)
            async with Client.open(stream) as client:
                self.agent = client.stub(agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
                self.health = client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"])
                task_status.started()
                await self._drop.wait()
        finally:
            self.agent = self.health = None
            self._dropped.set()

    async def disconnect(self) -> None:
        """Close the agent connection, if any."""
        if self._drop is not None and self._dropped is not None:
            self._drop.set()
            await self._dropped.wait()
        self._drop = self._dropped = None

    async def until_healthy(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Health.Check, retried only on timeouts: bytes sent before the guest
        opens its port at boot are lost. Any other error fails."""
        with trio.fail_after(timeout):
            while True:
                try:
                    await self.health.Check(health_pb2.CheckRequest(), timeout=1.0)
                    return
                except RpcError as e:
                    if e.code != Code.DEADLINE_EXCEEDED:
                        raise

    # -- containers -----------------------------------------------------------------

    async def start(
        self,
        cid: str,
        args: Sequence[str],
        *,
        storages: Sequence[agent_pb2.Storage] = (),
        binds: Sequence[tuple[str, str]] = (),
        root: str = "",
    ) -> None:
        """Create and start a container: its rootfs at ``root`` in the guest, or else a
        busybox rootfs made for it on the 9p share."""
        spec = make_spec(list(args))
        if root:
            spec.Root.Path = root
        else:
            make_rootfs(self.shared / cid / "rootfs")
        for source, destination in binds:
            spec.Mounts.add(destination=destination, source=source, type="bind",
                            options=["rbind", "rw"])  # fmt: skip
        request = agent_pb2.CreateContainerRequest(
            container_id=cid, exec_id=cid, OCI=spec, storages=list(storages)
        )
        await self.agent.CreateContainer(request, timeout=CALL_TIMEOUT)
        await self.agent.StartContainer(
            agent_pb2.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT
        )

    async def output(self, cid: str, exec_id: str = "") -> bytes:
        """The process's stdout up to the agent's EOF answer."""
        out = b""
        while True:
            try:
                resp = await self.agent.ReadStdout(
                    agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=4096),
                    timeout=CALL_TIMEOUT,
                )
            except RpcError as e:
                assert e.code == Code.OUT_OF_RANGE, e
                return out
            out += resp.data

    async def wait(self, cid: str, exec_id: str = "") -> int:
        resp = await self.agent.WaitProcess(
            agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id), timeout=CALL_TIMEOUT
        )
        return int(resp.status)

    async def remove(self, cid: str) -> None:
        await self.agent.RemoveContainer(
            agent_pb2.RemoveContainerRequest(container_id=cid), timeout=CALL_TIMEOUT
        )

    async def run_to_end(self, cid: str, script: str, **kw: Any) -> tuple[int, str]:
        """Run ``sh -c script`` in a new container; its exit status and stdout; remove it."""
        await self.start(cid, ["sh", "-c", script], **kw)
        out = await self.output(cid)
        status = await self.wait(cid)
        await self.remove(cid)
        return status, out.decode()

    async def interfaces(self) -> list[Any]:
        resp = await self.agent.ListInterfaces(
            agent_pb2.ListInterfacesRequest(), timeout=CALL_TIMEOUT
        )
        return list(resp.Interfaces)


def make_rootfs(root: Path) -> None:
    """A busybox rootfs: /bin/busybox and every applet as a symlink."""
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys", "tmp", "etc", "data"):
        (root / d).mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in applets():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")


@contextlib.contextmanager
def booted_vm(image: tuple[Path, Path]) -> Iterator[Vm]:
    """Boot a VM and create the agent's sandbox, with the 9p share mounted."""
    work = Path(tempfile.mkdtemp(prefix="hqg", dir="/tmp"))  # short: socket paths
    loop = Loop()
    hv = driver()
    machine = Vm(loop, hv, work / "shared")
    try:
        loop.run(hv.prepare, spec_for(work, image))
        loop.run(hv.start, 30)
        loop.run(tap_until, hv, AGENT_MARKER)
        loop.run(machine.connect)
        loop.run(machine.until_healthy)
        device = shared_fs_device("9p", work / "shared")
        storages = [shared_storage(device)]
        sandbox = agent_pb2.CreateSandboxRequest(hostname="husk-qg", storages=storages,
                                                 sandbox_id="qg")  # fmt: skip
        loop.run(machine.agent.CreateSandbox, sandbox, timeout=CALL_TIMEOUT)
        yield machine
    finally:
        try:
            loop.run(machine.disconnect)

            async def destroy() -> None:
                with trio.CancelScope(shield=True):
                    await hv.destroy()

            loop.run(destroy)
        finally:
            try:
                loop.close()
            finally:
                # a loop that died cannot stop QEMU: kill ours (its argv names our dir)
                leftover = qemu_pids(work)
                for pid in leftover:
                    os.kill(pid, signal.SIGKILL)
                shutil.rmtree(work, ignore_errors=True)
        assert not leftover, f"QEMU {leftover} outlived the driver's destroy()"


@pytest.fixture(scope="module")
def vm(image: tuple[Path, Path]) -> Iterator[Vm]:
    """The module's VM: a sandbox whose containers have their rootfs on the 9p share."""
    with booted_vm(image) as machine:
        yield machine


# --- disk ------------------------------------------------------------------------


def disk_storage() -> agent_pb2.Storage:
    return agent_pb2.Storage(
        driver="blk", source=DISK_SERIAL, fstype="ext4", mount_point=DISK_MOUNT
    )


_FIND_DISK = (
    "for d in /sys/block/*; do "
    f'[ "$(cat $d/serial 2>/dev/null)" = {DISK_SERIAL} ] && echo "disk ${{d##*/}} $(cat $d/size)"; '
    "done; "
)


def test_hot_added_disk_is_seen_written_removed_and_read_back(vm: Vm) -> None:
    work = vm.shared.parent
    image_file = work / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image_file), f"{DISK_MIB}M"],
                   check=True)  # fmt: skip
    subprocess.run(["mkfs.ext4", "-F", "-q", str(image_file)], check=True)
    disk = BlockDevice("blk0", image_file, serial=DISK_SERIAL)
    run = vm.loop.run

    run(vm.hv.add_device, disk)
    status, out = run(
        vm.run_to_end, "disk-w",
        _FIND_DISK + "echo written-by-the-guest > /data/hello && sync && cat /data/hello",
        storages=[disk_storage()], binds=[(DISK_MOUNT, "/data")],
    )  # fmt: skip
    assert status == 0, out
    lines = out.splitlines()
    name, sectors = lines[0].split()[1:]
    assert name.startswith("vd")
    assert int(sectors) * 512 == DISK_MIB << 20  # the guest sees a 64 MiB disk
    assert lines[1:] == ["written-by-the-guest"]

    run(vm.hv.remove_device, disk)  # returns on DEVICE_DELETED: the guest let go
    status, out = run(vm.run_to_end, "disk-gone", _FIND_DISK + "echo scanned")
    assert (status, out) == (0, "scanned\n")  # no disk with that serial in the guest
    host_view = subprocess.run(
        ["debugfs", "-R", "cat /hello", str(image_file)], capture_output=True, text=True
    )
    assert host_view.stdout == "written-by-the-guest\n", host_view.stderr

    run(vm.hv.add_device, disk)
    status, out = run(
        vm.run_to_end, "disk-r", _FIND_DISK + "cat /data/hello",
        storages=[disk_storage()], binds=[(DISK_MOUNT, "/data")],
    )  # fmt: skip
    assert status == 0, out
    assert out.splitlines()[0].split()[2] == sectors
    assert out.splitlines()[1:] == ["written-by-the-guest"]
    run(vm.hv.remove_device, disk)


# --- NIC -------------------------------------------------------------------------


def test_hot_added_nic_is_listed_by_the_agent_with_its_mac(vm: Vm) -> None:
    tap = "hqgtap" + vm.shared.parent.name[-6:]
    run = vm.loop.run
    assert NIC_MAC not in _macs(run(vm.interfaces))
    with IPRoute() as ipr:
        ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
    try:
        nic = NetDevice("net0", NIC_MAC, tap_name=tap)
        run(vm.hv.add_device, nic)
        assert run(_until_macs, vm, lambda macs: NIC_MAC in macs), "the NIC never showed"
        run(vm.hv.remove_device, nic)
        assert NIC_MAC not in _macs(run(vm.interfaces))  # gone once DEVICE_DELETED came
    finally:
        with IPRoute() as ipr, contextlib.suppress(NetlinkError):
            ipr.link("del", ifname=tap)
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=tap)


def _macs(interfaces: list[Any]) -> set[str]:
    return {i.hwAddr.lower() for i in interfaces}


async def _until_macs(vm: Vm, wanted: Callable[[set[str]], bool], timeout: float = 30) -> bool:
    """Poll ListInterfaces: the guest enumerates a hot-added NIC asynchronously."""
    with trio.move_on_after(timeout):
        while not wanted(_macs(await vm.interfaces())):
            await trio.sleep(0.2)
        return True
    return False


# --- reconnecting hosts ------------------------------------------------------------


def test_a_quick_reconnect_is_a_new_session(vm: Vm) -> None:
    run = vm.loop.run
    for _ in range(5):
        run(vm.connect)
        check = run(vm.health.Check, health_pb2.CheckRequest(), timeout=CALL_TIMEOUT)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
