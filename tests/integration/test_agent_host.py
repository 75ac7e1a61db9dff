"""The guest agent's container logic on this host: real runc, a busybox rootfs, real ttrpc.

The agent runs as ``python3 -m guest.agent --host-mode`` on a unix socket in a
temp dir, with its own runc ``--root`` and cgroup parent, so the host's runc
state, hostname and network are never touched. Needs root, runc and busybox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from agent_proto import agent_pb2, health_pb2, oci_pb2
from common import channel_auth
from shim.agent.transport import authenticate
from ttrpc.client import Client
from ttrpc.codes import Code
from ttrpc.errors import RpcError

RUNC = os.environ.get("HUSK_TEST_RUNTIME") or shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "echo", "cat", "sleep", "id", "tty", "true", "stty", "ls"]
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="runs containers with runc: needs root"),
    pytest.mark.skipif(not os.path.exists(RUNC), reason="runc is not installed"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
]

CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID"]


def make_spec(args: list[str], *, terminal: bool = False) -> oci_pb2.Spec:
    """A spec like ``runc spec``'s default, as Kata's protobuf."""
    spec = oci_pb2.Spec(Version="1.0.2", Hostname="husk-test")
    p = spec.Process
    p.Terminal = terminal
    p.Args.extend(args)
    p.Env.extend(["PATH=/bin", "TERM=xterm"])
    p.Cwd = "/"
    p.NoNewPrivileges = True
    for field in ("Bounding", "Effective", "Permitted"):
        getattr(p.Capabilities, field).extend(CAPS)
    p.Rlimits.add(Type="RLIMIT_NOFILE", Hard=1024, Soft=1024)
    spec.Root.Path = "rootfs"
    mounts = [
        ("/proc", "proc", "proc", []),
        ("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        ("/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666"]),
        ("/dev/shm", "shm", "tmpfs", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        ("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
    ]
    for dest, source, kind, options in mounts:
        spec.Mounts.add(destination=dest, source=source, type=kind, options=options)
    for ns in ("pid", "ipc", "uts", "mount", "network"):
        spec.Linux.Namespaces.add(Type=ns)
    spec.Linux.MaskedPaths.extend(["/proc/kcore", "/proc/keys"])
    spec.Linux.ReadonlyPaths.extend(["/proc/sys", "/proc/sysrq-trigger"])
    spec.Linux.Resources.Devices.add(Allow=False, Access="rwm")
    return spec


def make_rootfs(root: Path) -> None:
    """A busybox rootfs: /bin/busybox and its applets as symlinks."""
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


@dataclass
class Agent:
    """A running agent and a ttrpc client connected to it."""

    base: Path
    process: subprocess.Popen[bytes]
    agent: Any
    health: Any
    cgroup_parent: str

    @property
    def shared(self) -> Path:
        return self.base / "shared"

    @property
    def runc_root(self) -> Path:
        return self.base / "state" / "runc"

    def add_rootfs(self, cid: str) -> None:
        make_rootfs(self.shared / cid / "rootfs")

    async def create(self, cid: str, args: list[str], *, terminal: bool = False) -> None:
        self.add_rootfs(cid)
        await self.agent.CreateContainer(
            agent_pb2.CreateContainerRequest(
                container_id=cid, exec_id=cid, OCI=make_spec(args, terminal=terminal)
            ),
            timeout=30,
        )

    async def read_all(self, cid: str, exec_id: str = "", which: str = "stdout") -> bytes:
        """Read a stream to the agent's EOF answer."""
        read = self.agent.ReadStdout if which == "stdout" else self.agent.ReadStderr
        out = b""
        while True:
            try:
                resp = await read(
                    agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=4096),
                    timeout=30,
                )
            except RpcError as exc:
                assert exc.code == Code.OUT_OF_RANGE, exc
                return out
            out += resp.data

    async def wait(self, cid: str, exec_id: str = "") -> int:
        resp = await self.agent.WaitProcess(
            agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id), timeout=30
        )
        return int(resp.status)


@asynccontextmanager
async def running_agent(*, stop_with_sigterm: bool = False) -> AsyncIterator[Agent]:
    """Start the agent in host mode; on exit check it destroyed everything and exited.

    The agent is stopped by DestroySandbox, or by SIGTERM with ``stop_with_sigterm``.
    """
    base = Path(tempfile.mkdtemp(prefix="husk-agent-"))
    sock = base / "agent.sock"
    secret = base / "agent.secret"
    channel_auth.write_secret(secret)
    cgroup_parent = f"/husk-test-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, "-m", "guest.agent", "--host-mode", "--debug",
        "--listen", f"unix:{sock}", "--secret-file", str(secret),
        "--state-dir", str(base / "state"), "--shared-dir", str(base / "shared"),
        "--runc", RUNC, "--cgroup-parent", cgroup_parent,
    ]  # fmt: skip
    log = open(base / "agent.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(15):
            while not sock.exists():
                assert process.poll() is None, (base / "agent.log").read_text()
                await trio.sleep(0.05)
        stream = await trio.open_unix_socket(str(sock))
        await authenticate(stream, channel_auth.read_secret(secret), channel_auth.AGENT, str(sock))
        async with Client.open(stream) as client:
            agent = Agent(
                base,
                process,
                client.stub(agent_pb2.DESCRIPTOR.services_by_name["AgentService"]),
                client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"]),
                cgroup_parent,
            )
            yield agent
            if stop_with_sigterm:
                process.send_signal(signal.SIGTERM)
            else:
                await agent.agent.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
        with trio.fail_after(15):
            while process.poll() is None:
                await trio.sleep(0.05)
        assert process.returncode == 0, (base / "agent.log").read_text()
        assert_nothing_left(agent)
    except BaseException:
        print((base / "agent.log").read_text())
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def assert_nothing_left(agent: Agent) -> None:
    """No runc state, no process rooted in the test's rootfs, no cgroup left."""
    leftovers = [p.name for p in agent.runc_root.iterdir()] if agent.runc_root.exists() else []
    assert leftovers == [], f"runc state left behind: {leftovers}"
    rooted = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "root").startswith(str(agent.base)):
                    rooted.append(proc.name)
            except OSError:
                continue
    assert rooted == [], f"container processes left behind: {rooted}"
    cgroups = Path("/sys/fs/cgroup")
    left = [str(d) for d in cgroups.glob(f"*/{agent.cgroup_parent.lstrip('/')}")]
    left += [str(cgroups / agent.cgroup_parent.lstrip("/"))] * (
        cgroups / agent.cgroup_parent.lstrip("/")
    ).exists()
    assert left == [], f"cgroups left behind: {left}"
    bundles = agent.base / "state" / "bundles"
    assert not bundles.exists() or not list(bundles.iterdir())


async def create_sandbox(agent: Agent) -> None:
    await agent.agent.CreateSandbox(
        agent_pb2.CreateSandboxRequest(
            hostname="husk-sandbox", dns=["nameserver 192.0.2.53"], sandbox_id="sb1"
        ),
        timeout=10,
    )


async def test_echo_hello_and_exit_status() -> None:
    async with running_agent() as a:
        resp = await a.health.Check(health_pb2.CheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        await create_sandbox(a)
        assert (a.base / "state" / "resolv.conf").read_text() == "nameserver 192.0.2.53\n"
        await a.create("c1", ["echo", "hello"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c1"))
        assert await a.read_all("c1") == b"hello\n"
        assert await a.read_all("c1", which="stderr") == b""
        assert await a.wait("c1") == 0
        await a.agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="c1"))
        with pytest.raises(RpcError) as err:
            await a.wait("c1")
        assert err.value.code == Code.NOT_FOUND
        assert "'c1'" in str(err.value)


async def test_a_containerd_2_pod_spec_runs_on_the_hosts_runc() -> None:
    """runtime-spec 1.2.1 and containerd 2's pod sysctl: runc gets what it knows, no net.*."""
    async with running_agent() as a:
        await create_sandbox(a)
        a.add_rootfs("pod")
        spec = make_spec(["echo", "pod"])
        spec.Version = "1.2.1"
        spec.Linux.Sysctl["net.ipv4.ping_group_range"] = "0 2147483647"
        await a.agent.CreateContainer(
            agent_pb2.CreateContainerRequest(container_id="pod", exec_id="pod", OCI=spec),
            timeout=30,
        )
        config = json.loads((a.base / "state" / "bundles" / "pod" / "config.json").read_text())
        assert config["ociVersion"] == runc_version_max()
        assert "sysctl" not in config["linux"]
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="pod"))
        assert await a.read_all("pod") == b"pod\n"
        assert await a.wait("pod") == 0
        await a.agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="pod"))


def runc_version_max() -> str:
    """What the host's runtime says it knows (1.0.2 when it has no ``features``)."""
    done = subprocess.run([RUNC, "features"], capture_output=True, check=False)
    return str(json.loads(done.stdout)["ociVersionMax"]) if done.returncode == 0 else "1.0.2"


async def test_stdin_reaches_the_process_and_eof_ends_it() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        await a.create("c2", ["sh", "-c", "read x; echo got $x; cat; exit 3"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c2"))
        written = await a.agent.WriteStdin(
            agent_pb2.WriteStreamRequest(container_id="c2", data=b"hi\nrest\n")
        )
        assert written.len == 8
        await a.agent.CloseStdin(agent_pb2.CloseStdinRequest(container_id="c2"))
        assert await a.read_all("c2") == b"got hi\nrest\n"
        assert await a.wait("c2") == 3
        with pytest.raises(RpcError) as err:
            await a.agent.WriteStdin(agent_pb2.WriteStreamRequest(container_id="c2", data=b"x"))
        assert err.value.code == Code.OUT_OF_RANGE


async def test_exec_into_a_running_container_and_kill_it() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        await a.create("c3", ["sleep", "1000"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c3"))
        process = oci_pb2.Process(Args=["sh", "-c", "echo from-exec; echo oops >&2; exit 5"])
        process.Env.append("PATH=/bin")
        await a.agent.ExecProcess(
            agent_pb2.ExecProcessRequest(container_id="c3", exec_id="e1", process=process),
            timeout=30,
        )
        assert await a.read_all("c3", "e1") == b"from-exec\n"
        assert await a.read_all("c3", "e1", which="stderr") == b"oops\n"
        assert await a.wait("c3", "e1") == 5
        with pytest.raises(RpcError) as err:  # waited and drained: forgotten
            await a.wait("c3", "e1")
        assert err.value.code == Code.NOT_FOUND
        assert "'e1'" in str(err.value)
        await a.agent.SignalProcess(
            agent_pb2.SignalProcessRequest(container_id="c3", signal=signal.SIGKILL)
        )
        assert await a.wait("c3") == 128 + signal.SIGKILL


async def test_sigterm_to_an_init_without_handler_kills_it() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        await a.create("c4", ["sleep", "1000"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c4"))
        await a.agent.SignalProcess(
            agent_pb2.SignalProcessRequest(container_id="c4", exec_id="c4", signal=signal.SIGTERM)
        )
        assert await a.wait("c4", "c4") == 128 + signal.SIGKILL


async def test_pause_resume_stats_and_remove_while_running() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        await a.create("c5", ["sh", "-c", "while true; do echo tick; sleep 0.1; done"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c5"))
        out = await a.agent.ReadStdout(agent_pb2.ReadStreamRequest(container_id="c5", len=5))
        assert out.data.startswith(b"t")
        stats = await a.agent.StatsContainer(agent_pb2.StatsContainerRequest(container_id="c5"))
        assert stats.cgroup_stats.memory_stats.usage.usage > 0
        assert stats.cgroup_stats.pids_stats.current >= 1
        await a.agent.PauseContainer(agent_pb2.PauseContainerRequest(container_id="c5"))
        with pytest.raises(RpcError) as err:
            await a.agent.PauseContainer(agent_pb2.PauseContainerRequest(container_id="c5"))
        assert err.value.code == Code.FAILED_PRECONDITION
        await a.agent.ResumeContainer(agent_pb2.ResumeContainerRequest(container_id="c5"))
        await a.agent.RemoveContainer(
            agent_pb2.RemoveContainerRequest(container_id="c5", timeout=20), timeout=30
        )


async def test_terminal_process() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        await a.create("c6", ["sh", "-c", "read x; stty size; echo got $x"], terminal=True)
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c6"))
        await a.agent.TtyWinResize(
            agent_pb2.TtyWinResizeRequest(container_id="c6", row=33, column=77)
        )
        await a.agent.WriteStdin(agent_pb2.WriteStreamRequest(container_id="c6", data=b"yo\r"))
        out = await a.read_all("c6")
        assert b"33 77" in out
        assert b"got yo" in out
        assert await a.read_all("c6", which="stderr") == b""
        assert await a.wait("c6") == 0


async def test_request_errors_name_their_object() -> None:
    async with running_agent() as a:
        with pytest.raises(RpcError) as err:
            await a.create("early", ["true"])
        assert err.value.code == Code.FAILED_PRECONDITION
        await create_sandbox(a)
        await a.create("c7", ["true"])
        with pytest.raises(RpcError) as err:
            await a.agent.CreateContainer(
                agent_pb2.CreateContainerRequest(container_id="c7", OCI=make_spec(["true"]))
            )
        assert err.value.code == Code.ALREADY_EXISTS
        assert "'c7'" in str(err.value)
        with pytest.raises(RpcError) as err:
            await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="nope"))
        assert err.value.code == Code.NOT_FOUND
        assert "'nope'" in str(err.value)
        with pytest.raises(RpcError) as err:
            await a.agent.CreateContainer(
                agent_pb2.CreateContainerRequest(container_id="c8", OCI=make_spec(["true"]))
            )
        assert err.value.code == Code.NOT_FOUND  # no rootfs for c8
        a.add_rootfs("c9")
        with pytest.raises(RpcError) as err:
            await a.agent.CreateContainer(
                agent_pb2.CreateContainerRequest(
                    container_id="c9", OCI=make_spec(["/no/such/binary"])
                ),
                timeout=30,
            )
        assert "c9" in str(err.value)
        with pytest.raises(RpcError) as err:
            await a.agent.GetIPTables(agent_pb2.GetIPTablesRequest())
        assert err.value.code == Code.UNIMPLEMENTED
        with pytest.raises(RpcError) as err:
            await a.agent.UpdateRoutes(agent_pb2.UpdateRoutesRequest())
        assert err.value.code == Code.FAILED_PRECONDITION  # host mode never touches the network
        # The agent is still fine after all that.
        await a.create("c10", ["echo", "still here"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c10"))
        assert await a.read_all("c10") == b"still here\n"


async def test_rootfs_from_a_storage_is_mounted_and_unmounted() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        source = a.base / "image"
        make_rootfs(source)
        (source / "etc" / "marker").write_text("from-storage\n")
        mount_point = a.base / "mnt" / "c11"
        spec = make_spec(["cat", "/etc/marker"])
        spec.Root.Path = str(mount_point)
        storage = agent_pb2.Storage(driver="bind", source=str(source), mount_point=str(mount_point))
        await a.agent.CreateContainer(
            agent_pb2.CreateContainerRequest(container_id="c11", OCI=spec, storages=[storage]),
            timeout=30,
        )
        assert is_mounted(mount_point)
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c11"))
        assert await a.read_all("c11") == b"from-storage\n"
        assert await a.wait("c11") == 0
        await a.agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="c11"))
        assert not is_mounted(mount_point)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.mark.skipif(not shutil.which("losetup"), reason="needs losetup")
async def test_rootfs_on_a_block_device() -> None:
    async with running_agent() as a:
        await create_sandbox(a)
        tree = a.base / "tree"
        make_rootfs(tree)
        (tree / "etc" / "marker").write_text("from-disk\n")
        image = a.base / "disk.img"
        subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            mount_point = a.base / "c12-rootfs"
            spec = make_spec(["cat", "/etc/marker"])
            spec.Root.Path = str(mount_point)
            storage = agent_pb2.Storage(
                driver="blk", source=loop, fstype="ext4", mount_point=str(mount_point)
            )
            await a.agent.CreateContainer(
                agent_pb2.CreateContainerRequest(container_id="c12", OCI=spec, storages=[storage]),
                timeout=30,
            )
            await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c12"))
            assert await a.read_all("c12") == b"from-disk\n"
            assert await a.wait("c12") == 0
            await a.agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="c12"))
            assert not is_mounted(mount_point)
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)


async def test_sigterm_removes_every_container_before_the_agent_exits() -> None:
    async with running_agent(stop_with_sigterm=True) as a:
        await create_sandbox(a)
        await a.create("c13", ["sleep", "1000"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="c13"))
        await a.create("c14", ["sleep", "1000"])  # created, never started


async def test_reset_sandbox_leaves_nothing_and_the_agent_serves_a_new_sandbox() -> None:
    """ResetSandbox (a pool VM handed on): containers, runc state and bundles go; it serves on."""
    async with running_agent() as a:
        await create_sandbox(a)
        await a.create("warm", ["sleep", "1000"])
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="warm"))
        await a.create("idle", ["sleep", "1000"])  # created, never started
        await a.agent.ResetSandbox(agent_pb2.ResetSandboxRequest(), timeout=60)
        assert a.process.poll() is None  # still serving
        assert_nothing_left(a)
        assert list((a.base / "state" / "bundles").iterdir()) == []
        with pytest.raises(RpcError) as err:
            await a.wait("warm")
        assert err.value.code == Code.NOT_FOUND
        await create_sandbox(a)
        # the same id (and its rootfs, which is the host's): runc has nothing of the old one
        await a.agent.CreateContainer(
            agent_pb2.CreateContainerRequest(
                container_id="warm", exec_id="warm", OCI=make_spec(["echo", "again"])
            ),
            timeout=30,
        )
        await a.agent.StartContainer(agent_pb2.StartContainerRequest(container_id="warm"))
        assert await a.read_all("warm") == b"again\n"
        assert await a.wait("warm") == 0
