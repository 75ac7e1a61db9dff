"""The guest agent inside the real VM, booted by a plain QEMU command (no plugin).

One VM (TCG, virtio-serial agent channel, 9p share of a host dir) serves every
test of this module, in order: the agent answers Health over virtio-serial with
husk's ttrpc client; the pod's first container, written as containerd 2 writes
it (runtime-spec 1.2.1, pod sysctls), sets the pod network's sysctls on the VM
and runs on crun; a container made from a busybox rootfs on the 9p share runs
and returns its stdout and exit code; a second process is exec'd into a running
container and signalled; the container is removed; ResetSandbox leaves the VM
ready for a new sandbox, whose containers may reuse the last one's ids;
DestroySandbox powers the guest off and QEMU exits by itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from agent_proto import agent_pb2, health_pb2, oci_pb2
from guest.image import DEFAULT_IMAGE_DIR, build_image, image_paths
from plugins.qemu.cmdline import BASE_KERNEL_PARAMS
from shim.agent.transport import connect
from shim.hypervisor import SerialEndpoint
from shim.sandbox.rootfs import shared_fs_device, shared_storage
from tests.integration.test_agent_host import make_rootfs, make_spec
from ttrpc import Client, Code, RpcError

pytestmark = [pytest.mark.integration]

BOOT_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
T = TypeVar("T")


class Guest:
    """The booted VM, and one agent connection owned by a trio loop in a thread.

    Tests are plain functions that run coroutines on that loop through
    ``run``: the VM and its single virtio-serial connection outlive each test,
    as the module's tests share one boot.
    """

    def __init__(self, qemu: subprocess.Popen[bytes], work: Path) -> None:
        self.qemu = qemu
        self.shared = work / "shared"
        self.console = work / "console.log"
        self._socket = work / "agent.sock"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.agent: Any = None
        self.health: Any = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait(BOOT_TIMEOUT + 10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._own_connection)
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _own_connection(self) -> None:
        stream = await connect(SerialEndpoint(self._socket), timeout=BOOT_TIMEOUT)
        async with Client.open(stream) as client:
            self.agent = client.stub(agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
            self.health = client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"])
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``afn(*args)`` on the connection's loop and return its result."""
        assert self._token is not None, "the agent connection is not up"

        async def bounded() -> T:
            with trio.fail_after(BOOT_TIMEOUT):  # a stuck agent fails the test, never hangs it
                return await afn(*args)

        return trio.from_thread.run(bounded, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)

    async def read_all(self, cid: str, exec_id: str = "") -> bytes:
        out = b""
        while True:
            try:
                resp = await self.agent.ReadStdout(
                    agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=4096),
                    timeout=CALL_TIMEOUT,
                )
            except RpcError as e:
                assert e.code == Code.OUT_OF_RANGE, e  # the agent's EOF answer
                return out
            out += resp.data

    async def wait(self, cid: str, exec_id: str = "") -> int:
        resp = await self.agent.WaitProcess(
            agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id), timeout=CALL_TIMEOUT
        )
        return int(resp.status)

    async def create_and_start(
        self, cid: str, args: list[str], spec: oci_pb2.Spec | None = None
    ) -> None:
        """Create ``cid`` from ``spec`` (default: ``make_spec(args)``) and start it."""
        if not (self.shared / cid / "rootfs").exists():
            make_rootfs(self.shared / cid / "rootfs")
        await self.agent.CreateContainer(
            agent_pb2.CreateContainerRequest(
                container_id=cid, exec_id=cid, OCI=spec or make_spec(args)
            ),
            timeout=CALL_TIMEOUT,
        )
        await self.agent.StartContainer(
            agent_pb2.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT
        )

    async def until_healthy(self) -> health_pb2.HealthCheckResponse:
        """Health.Check, retried: bytes sent before the guest opens its port are lost."""
        with trio.fail_after(BOOT_TIMEOUT):
            while True:
                try:
                    resp: health_pb2.HealthCheckResponse = await self.health.Check(
                        health_pb2.CheckRequest(), timeout=0.5
                    )
                    return resp
                except RpcError as e:
                    if e.code != Code.DEADLINE_EXCEEDED:
                        raise


def qemu_argv(kernel: Path, initrd: Path, work: Path, shared: Path) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-nodefaults", "-no-user-config",
        "-nographic", "-m", "512", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", BASE_KERNEL_PARAMS,
        "-serial", f"file:{work / 'console.log'}",
        "-device", "virtio-rng-pci",
        "-fsdev", f"local,id=share,path={shared},security_model=none",
        "-device", "virtio-9p-pci,fsdev=share,mount_tag=kataShared",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={work / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.channel.0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    build_image(DEFAULT_IMAGE_DIR)
    kernel, initrd = image_paths(DEFAULT_IMAGE_DIR)
    work = Path(tempfile.mkdtemp(prefix="husk-guest-"))
    (work / "shared").mkdir()
    qemu = subprocess.Popen(
        qemu_argv(kernel, initrd, work, work / "shared"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    g = None
    try:
        g = Guest(qemu, work)
        g.run(g.until_healthy)
        yield g
    finally:
        if g is not None:
            g.close()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        shutil.rmtree(work, ignore_errors=True)


def test_agent_answers_health_over_virtio_serial(guest: Guest) -> None:
    resp = guest.run(guest.until_healthy)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    version = guest.run(guest.health.Version, health_pb2.CheckRequest())
    assert version.agent_version


def test_sandbox_mounts_the_9p_share(guest: Guest) -> None:
    share = shared_storage(shared_fs_device("9p", guest.shared))
    assert share is not None
    request = agent_pb2.CreateSandboxRequest(hostname="husk-vm", storages=[share], sandbox_id="vm")
    guest.run(guest.agent.CreateSandbox, request)


#: what containerd 2's CRI puts on a pod's sandbox spec, and a pod sysctl of the user's
POD_SYSCTLS = {"net.ipv4.ping_group_range": "0 2147483647", "net.ipv4.ip_forward": "1"}


def containerd_2_spec(args: list[str], sysctls: dict[str, str]) -> oci_pb2.Spec:
    """``make_spec`` as containerd 2.1 writes it: runtime-spec 1.2.1, with ``sysctls``."""
    spec = make_spec(args)
    spec.Version = "1.2.1"
    for key, value in sysctls.items():
        spec.Linux.Sysctl[key] = value
    return spec


def create_error(guest: Guest, cid: str, spec: oci_pb2.Spec) -> RpcError:
    with pytest.raises(RpcError) as err:
        guest.run(guest.create_and_start, cid, [], spec)
    return err.value


def test_a_pod_sysctl_the_vm_cannot_take_fails_naming_it(guest: Guest) -> None:
    spec = containerd_2_spec(["true"], {**POD_SYSCTLS, "net.ipv4.no_such_knob": "1"})
    err = create_error(guest, "bad", spec)
    assert err.code == Code.INVALID_ARGUMENT
    assert "sysctl net.ipv4.no_such_knob cannot be set on the VM's network" in str(err)


def test_a_pod_sysctl_value_the_guest_kernel_refuses_fails_naming_it(guest: Guest) -> None:
    spec = containerd_2_spec(["true"], {"net.ipv4.ip_forward": "banana"})
    err = create_error(guest, "bad2", spec)
    assert err.code == Code.INVALID_ARGUMENT
    assert "sysctl net.ipv4.ip_forward='banana' cannot be set on the VM's network" in str(err)


def test_an_unknown_spec_major_version_fails_in_one_line(guest: Guest) -> None:
    spec = containerd_2_spec(["true"], {})
    spec.Version = "2.0.0"
    err = create_error(guest, "future", spec)
    assert err.code == Code.INVALID_ARGUMENT
    assert "ociVersion 2.0.0 is not supported" in str(err) and "\n" not in str(err)


def test_the_pods_first_container_sets_its_network_sysctls_on_the_vm(guest: Guest) -> None:
    script = "cat /proc/sys/net/ipv4/ping_group_range /proc/sys/net/ipv4/ip_forward"
    guest.run(
        guest.create_and_start, "pause", [], containerd_2_spec(["sh", "-c", script], POD_SYSCTLS)
    )
    out = guest.run(guest.read_all, "pause")
    assert guest.run(guest.wait, "pause") == 0
    assert out.split() == [b"0", b"2147483647", b"1"]


def test_a_later_container_keeps_its_own_namespaces_sysctls(guest: Guest) -> None:
    # the pod's value again (dropped), and an IPC-namespace sysctl (the runtime sets it)
    sysctls = {"net.ipv4.ping_group_range": "0 2147483647", "kernel.shm_rmid_forced": "1"}
    spec = containerd_2_spec(["cat", "/proc/sys/kernel/shm_rmid_forced"], sysctls)
    guest.run(guest.create_and_start, "app", [], spec)
    assert guest.run(guest.read_all, "app") == b"1\n"
    assert guest.run(guest.wait, "app") == 0


def test_a_later_container_cannot_change_the_pods_network(guest: Guest) -> None:
    spec = containerd_2_spec(["true"], {"net.ipv4.ip_forward": "0"})
    err = create_error(guest, "app2", spec)
    assert err.code == Code.INVALID_ARGUMENT
    assert "sets sysctl net.ipv4.ip_forward='0', but its network is the pod's" in str(err)


def test_the_runtimes_errors_name_crun(guest: Guest) -> None:
    err = create_error(guest, "nobin", make_spec(["/no/such/binary"]))
    assert str(err).count("crun create of container 'nobin' failed") == 1, err


def test_pod_containers_are_removed(guest: Guest) -> None:
    for cid in ("pause", "app"):
        guest.run(guest.agent.RemoveContainer, agent_pb2.RemoveContainerRequest(container_id=cid))


def test_container_from_9p_rootfs_returns_stdout_and_exit_code(guest: Guest) -> None:
    guest.run(guest.create_and_start, "c1", ["sh", "-c", "echo hello from $(uname -r); exit 3"])
    out = guest.run(guest.read_all, "c1")
    assert guest.run(guest.wait, "c1") == 3
    assert out.startswith(b"hello from ")
    assert out.decode().split()[-1] != os.uname().release  # the guest's kernel, not ours
    guest.run(guest.agent.RemoveContainer, agent_pb2.RemoveContainerRequest(container_id="c1"))


def test_exec_into_a_running_container_and_signal_it(guest: Guest) -> None:
    guest.run(guest.create_and_start, "c2", ["sleep", "1000"])
    process = make_spec(["sh", "-c", "echo exec-ok; exec sleep 1000"]).Process
    guest.run(
        guest.agent.ExecProcess,
        agent_pb2.ExecProcessRequest(container_id="c2", exec_id="e1", process=process),
    )
    # the first line arrives while the exec'd process still runs
    first = guest.run(
        guest.agent.ReadStdout,
        agent_pb2.ReadStreamRequest(container_id="c2", exec_id="e1", len=4096),
    )
    assert first.data == b"exec-ok\n"
    kill = agent_pb2.SignalProcessRequest(container_id="c2", exec_id="e1", signal=signal.SIGKILL)
    guest.run(guest.agent.SignalProcess, kill)
    assert guest.run(guest.wait, "c2", "e1") == 128 + signal.SIGKILL
    kill = agent_pb2.SignalProcessRequest(container_id="c2", exec_id="", signal=signal.SIGKILL)
    guest.run(guest.agent.SignalProcess, kill)
    assert guest.run(guest.wait, "c2") == 128 + signal.SIGKILL


def test_removed_container_is_gone(guest: Guest) -> None:
    guest.run(guest.agent.RemoveContainer, agent_pb2.RemoveContainerRequest(container_id="c2"))
    with pytest.raises(RpcError) as err:
        guest.run(guest.wait, "c2")
    assert err.value.code == Code.NOT_FOUND and "c2" in str(err.value)


def test_a_removed_containers_id_can_be_created_again(guest: Guest) -> None:
    """RemoveContainer deletes crun's state (crun keeps ``status``, not runc's ``state.json``)."""
    guest.run(guest.create_and_start, "c2", ["echo", "second life"])
    assert guest.run(guest.read_all, "c2") == b"second life\n"
    assert guest.run(guest.wait, "c2") == 0
    guest.run(guest.agent.RemoveContainer, agent_pb2.RemoveContainerRequest(container_id="c2"))


def test_reset_sandbox_lets_the_vm_take_a_new_sandbox(guest: Guest) -> None:
    """ResetSandbox (a pool VM handed on): crun's state goes too, so an id can come again."""
    guest.run(guest.create_and_start, "warm", ["sleep", "1000"])
    guest.run(guest.agent.ResetSandbox, agent_pb2.ResetSandboxRequest())
    with pytest.raises(RpcError) as err:
        guest.run(guest.wait, "warm")
    assert err.value.code == Code.NOT_FOUND
    share = shared_storage(shared_fs_device("9p", guest.shared))
    assert share is not None
    request = agent_pb2.CreateSandboxRequest(hostname="pod", storages=[share], sandbox_id="pod")
    guest.run(guest.agent.CreateSandbox, request)
    for cid in ("warm", "c1"):  # ids the last sandbox had, its containers removed by crun
        guest.run(guest.create_and_start, cid, ["echo", "again"])
        assert guest.run(guest.read_all, cid) == b"again\n"
        assert guest.run(guest.wait, cid) == 0


def test_destroy_sandbox_powers_the_guest_off(guest: Guest) -> None:
    try:
        guest.run(guest.agent.DestroySandbox, agent_pb2.DestroySandboxRequest())
    except RpcError as e:  # the guest may power off before its answer leaves it
        assert e.code == Code.UNAVAILABLE, e
    try:
        guest.qemu.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("QEMU did not exit after DestroySandbox")
    assert guest.qemu.returncode == 0
    assert "powering off" in guest.console.read_text(errors="replace")
