"""husk's ttrpc client drives containerd's own ``containerd-shim-runc-v2``.

The test plays containerd: it builds a bundle (a busybox-static rootfs and a
runc ``config.json``), starts the shim the way containerd 1.6 does, talks
``containerd.task.v2.Task`` to the address the shim prints, and serves
``containerd.services.events.ttrpc.v1.Events`` with husk's own Server on the
``TTRPC_ADDRESS`` the shim publishes events to. No containerd daemon runs.

The contract followed (containerd runtime/v2 ``shim.Command`` and ``binary.Start``):

- argv ``-namespace NS -address CONTAINERD_ADDR -publish-binary BIN -id ID start``,
  cwd = the bundle, env ``TTRPC_ADDRESS`` / ``GRPC_ADDRESS`` / ``NAMESPACE``, stdin
  the (empty) runtime options;
- the shim prints ``unix:///run/containerd/s/<hash>`` and leaves a daemon serving it;
- the daemon writes its log to the fifo ``log`` in the bundle, which containerd
  holds open for reading (without a reader the daemon does not start);
- ``delete`` in the bundle cleans up after a shim that can no longer be reached.

Needs root (runc creates namespaces and cgroups); CI runs as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from agent_proto import events_pb2, events_ttrpc_pb2, task_pb2, task_types_pb2
from ttrpc import (
    CallContext,
    Client,
    Code,
    ConnectionClosed,
    DeadlineExceeded,
    RpcError,
    Server,
)

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc needs root to create a container"),
]

SHIM = "containerd-shim-runc-v2"
TASK = task_pb2.DESCRIPTOR.services_by_name["Task"]
EVENTS = events_ttrpc_pb2.DESCRIPTOR.services_by_name["Events"]
RUNC_STATE_ROOT = Path("/run/containerd/runc")  # the shim's default runc --root parent
BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "echo", "sleep", "cat", "true", "false", "ls"]


# ---------------------------------------------------------------- bundle


def make_bundle(bundle: Path, args: list[str]) -> None:
    """A busybox-static rootfs plus the ``config.json`` ``runc spec`` writes, edited."""
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} is missing: apt-get install -y busybox-static")
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys", "tmp"):
        (rootfs / d).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["hostname"] = "husk-conformance"
    config_path.write_text(json.dumps(config, indent=1))


# ---------------------------------------------------------------- fake containerd events


@dataclass
class Recorded:
    namespace: str
    topic: str
    type_url: str
    event: any_pb2.Any


@dataclass
class EventsService:
    """``containerd.services.events.ttrpc.v1.Events`` recording what a shim forwards."""

    events: list[Recorded] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def Forward(
        self, request: events_ttrpc_pb2.ForwardRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        env = request.envelope
        self.events.append(Recorded(env.namespace, env.topic, env.event.type_url, env.event))
        self.changed.set()
        self.changed = trio.Event()
        return empty_pb2.Empty()

    def topics(self) -> list[str]:
        return [e.topic for e in self.events]

    async def wait_for(self, topic: str, timeout: float = 10) -> Recorded:
        with trio.fail_after(timeout):
            while True:
                for e in self.events:
                    if e.topic == topic:
                        return e
                await self.changed.wait()

    def decode(self, topic: str, message: type[Message]) -> Message:
        (rec,) = [e for e in self.events if e.topic == topic]
        # containerd's typeurl names the message without the type.googleapis.com/ prefix
        assert rec.type_url == message.DESCRIPTOR.full_name, rec.type_url
        return message.FromString(rec.event.value)


# ---------------------------------------------------------------- the shim


@dataclass
class RuncShim:
    """A started ``containerd-shim-runc-v2`` and everything to talk to and clean it."""

    id: str
    namespace: str
    bundle: Path
    address: str
    containerd_address: Path
    events: EventsService
    log: bytearray
    stdout: bytearray

    @property
    def socket(self) -> str:
        return self.address.removeprefix("unix://")

    def shim_pids(self) -> list[int]:
        """Live daemons started for exactly this namespace and id (both random per test)."""
        want = ["-namespace", self.namespace, "-id", self.id]
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if Path(argv[0]).name == SHIM and argv[1:5] == want and pid_alive(int(proc.name)):
                found.append(int(proc.name))
        return found

    def diagnostics(self) -> str:
        return f"shim log:\n{self.log.decode(errors='replace')}"


async def drain_fifo(path: Path, sink: bytearray) -> None:
    """Hold ``path`` open for reading, as containerd does, and collect what comes."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # RDWR: never EOF, never blocks opening
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            sink += chunk


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a reaped-by-nobody zombie still "exists"; it is dead for our purposes
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


def cleanup_shim(shim: RuncShim, env: dict[str, str]) -> list[str]:
    """Tear down whatever the test left: the task, the shim daemon, sockets, runc state.

    Returns what had to be cleaned by force (empty when the test's own Delete and
    Shutdown did everything).
    """
    forced: list[str] = []
    runc_root = RUNC_STATE_ROOT / shim.namespace
    if (runc_root / shim.id).exists():
        forced.append("runc state")
        # what containerd does when it cannot reach a shim: `shim ... delete` in the bundle
        subprocess.run(
            [SHIM, "-namespace", shim.namespace, "-address", str(shim.containerd_address),
             "-publish-binary", "/bin/false", "-id", shim.id, "delete"],
            cwd=shim.bundle, env=env, capture_output=True, stdin=subprocess.DEVNULL,
            check=False, timeout=30,
        )  # fmt: skip
        subprocess.run(
            ["runc", "--root", str(runc_root), "delete", "--force", shim.id],
            capture_output=True, check=False, timeout=30,
        )  # fmt: skip
    for pid in shim.shim_pids():
        forced.append(f"shim pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if os.path.exists(shim.socket):
        forced.append(f"socket {shim.socket}")
        os.unlink(shim.socket)
    shutil.rmtree(runc_root, ignore_errors=True)
    return forced


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    """A short private dir (sockets need short paths)."""
    d = Path(f"/tmp/husk-shim-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def start_shim(
    nursery: trio.Nursery, sandbox: Path, args: list[str], events: EventsService
) -> tuple[RuncShim, dict[str, str]]:
    for tool, package in ((SHIM, "containerd"), ("runc", "runc")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH: apt-get install -y {package}")
    ident = f"c-{uuid.uuid4().hex[:8]}"
    namespace = f"husk-conf-{uuid.uuid4().hex[:6]}"
    bundle = sandbox / ident
    bundle.mkdir()
    make_bundle(bundle, args)

    containerd_address = sandbox / "containerd.sock"  # only hashed into the shim's socket name
    events_address = sandbox / "containerd.sock.ttrpc"
    events_server = Server()
    events_server.register(EVENTS, events)
    await nursery.start(events_server.serve_unix, events_address)

    log, stdout = bytearray(), bytearray()
    for name, sink in (("log", log), ("stdout", stdout), ("stderr", stdout)):
        os.mkfifo(bundle / name, 0o600)
        nursery.start_soon(drain_fifo, bundle / name, sink)

    env = dict(os.environ)
    env.update(
        TTRPC_ADDRESS=str(events_address),
        GRPC_ADDRESS=str(containerd_address),
        NAMESPACE=namespace,
    )
    argv = [
        SHIM, "-namespace", namespace, "-address", str(containerd_address),
        "-publish-binary", "/bin/false", "-id", ident, "start",
    ]  # fmt: skip
    with trio.fail_after(30):
        proc = await trio.run_process(
            argv, cwd=bundle, env=env, stdin=b"", capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    shim = RuncShim(
        ident, namespace, bundle, proc.stdout.decode().strip(), containerd_address, events,
        log, stdout,
    )  # fmt: skip
    if proc.returncode != 0 or not shim.address.startswith("unix:///"):
        cleanup_shim(shim, env)
        pytest.fail(
            f"{' '.join(argv)} failed (exit {proc.returncode}): "
            f"stdout={proc.stdout!r} stderr={proc.stderr!r}"
        )
    return shim, env


async def open_client(nursery: trio.Nursery, path: str) -> Client:
    """A husk Client on ``path`` whose connection lives in a background task.

    The test body deliberately does not run inside ``async with Client.open(...)``:
    there, an exception leaving the block is replaced by the Cancelled raised in
    ``open``'s ``finally`` (``await aclose_forcefully`` after cancelling its own
    nursery) and swallowed, so a failing assertion would pass.
    """

    async def run(*, task_status: trio.TaskStatus[Client]) -> None:
        stream = await trio.open_unix_socket(path)
        async with Client.open(stream) as client:
            task_status.started(client)
            await trio.sleep_forever()

    client: Client = await nursery.start(run)
    return client


StartShim = Callable[[list[str]], Awaitable[tuple[RuncShim, Client]]]


@pytest.fixture
async def runc_shim(nursery: trio.Nursery, sandbox_dir: Path) -> AsyncIterator[StartShim]:
    """``await runc_shim(args)`` starts a shim for a container running ``args``.

    Teardown removes whatever the test's own Delete/Shutdown did not.
    """
    started: list[tuple[RuncShim, dict[str, str]]] = []

    async def start(args: list[str]) -> tuple[RuncShim, Client]:
        shim, env = await start_shim(nursery, sandbox_dir, args, EventsService())
        started.append((shim, env))
        return shim, await open_client(nursery, shim.socket)

    yield start
    for shim, env in started:
        cleanup_shim(shim, env)


# ---------------------------------------------------------------- tests


async def test_container_lifecycle(runc_shim: StartShim) -> None:
    """Connect, Create, State, Start, Wait, State, Delete, State (NotFound), Shutdown."""
    shim, client = await runc_shim(
        ["sh", "-c", "echo hello from busybox; echo to-stderr >&2; exit 7"]
    )
    task = client.stub(TASK)
    cid = shim.id

    conn = await task.Connect(task_pb2.ConnectRequest(id=cid), timeout=10)
    assert [conn.shim_pid] == shim.shim_pids()

    created = await task.Create(
        task_pb2.CreateTaskRequest(
            id=cid,
            bundle=str(shim.bundle),
            stdout=str(shim.bundle / "stdout"),
            stderr=str(shim.bundle / "stderr"),
        ),
        timeout=30,
    )
    assert created.pid > 0, shim.diagnostics()

    state = await task.State(task_pb2.StateRequest(id=cid), timeout=10)
    assert state.id == cid
    assert state.status == task_types_pb2.CREATED
    assert state.pid == created.pid
    assert state.bundle == str(shim.bundle)

    started = await task.Start(task_pb2.StartRequest(id=cid), timeout=30)
    assert started.pid == created.pid

    waited = await task.Wait(task_pb2.WaitRequest(id=cid), timeout=30)
    assert waited.exit_status == 7
    assert waited.exited_at.seconds > 0

    state = await task.State(task_pb2.StateRequest(id=cid), timeout=10)
    assert state.status == task_types_pb2.STOPPED
    assert state.exit_status == 7

    deleted = await task.Delete(task_pb2.DeleteRequest(id=cid), timeout=30)
    assert deleted.exit_status == 7
    assert deleted.pid == created.pid

    with pytest.raises(RpcError) as info:
        await task.State(task_pb2.StateRequest(id=cid), timeout=10)
    assert info.value.code is Code.NOT_FOUND, info.value

    await shim.events.wait_for("/tasks/delete")
    await task.Shutdown(task_pb2.ShutdownRequest(id=cid), timeout=10)
    with trio.fail_after(10):
        while shim.shim_pids() or os.path.exists(shim.socket):
            await trio.sleep(0.05)

    assert shim.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert {e.namespace for e in shim.events.events} == {shim.namespace}
    create = shim.events.decode("/tasks/create", events_pb2.TaskCreate)
    assert (create.container_id, create.pid, create.bundle) == (cid, created.pid, str(shim.bundle))
    start = shim.events.decode("/tasks/start", events_pb2.TaskStart)
    assert (start.container_id, start.pid) == (cid, created.pid)
    exit_ = shim.events.decode("/tasks/exit", events_pb2.TaskExit)
    assert (exit_.container_id, exit_.pid, exit_.exit_status) == (cid, created.pid, 7)
    delete = shim.events.decode("/tasks/delete", events_pb2.TaskDelete)
    assert (delete.container_id, delete.pid, delete.exit_status) == (cid, created.pid, 7)

    with trio.fail_after(5):
        while b"hello from busybox\n" not in shim.stdout or b"to-stderr\n" not in shim.stdout:
            await trio.sleep(0.05)


async def test_kill_a_running_container(runc_shim: StartShim) -> None:
    """Pids, a Wait deadline on a running task, Kill, then Wait reports the signal."""
    shim, client = await runc_shim(["sleep", "300"])
    task = client.stub(TASK)
    cid = shim.id
    await task.Create(
        task_pb2.CreateTaskRequest(
            id=cid,
            bundle=str(shim.bundle),
            # shim-runc 1.6 opens stderr even when empty: give both, as containerd does
            stdout=str(shim.bundle / "stdout"),
            stderr=str(shim.bundle / "stderr"),
        ),
        timeout=30,
    )
    started = await task.Start(task_pb2.StartRequest(id=cid), timeout=30)
    state = await task.State(task_pb2.StateRequest(id=cid), timeout=10)
    assert state.status == task_types_pb2.RUNNING

    pids = await task.Pids(task_pb2.PidsRequest(id=cid), timeout=10)
    assert started.pid in [p.pid for p in pids.processes]

    # runc's Wait ignores the deadline it is sent; ours must still end the call on time
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded):
        await task.Wait(task_pb2.WaitRequest(id=cid), timeout=0.3)
    assert trio.current_time() - start < 2

    await task.Kill(task_pb2.KillRequest(id=cid, signal=signal.SIGKILL), timeout=10)
    waited = await task.Wait(task_pb2.WaitRequest(id=cid), timeout=30)
    assert waited.exit_status == 128 + signal.SIGKILL

    await task.Delete(task_pb2.DeleteRequest(id=cid), timeout=30)
    await shim.events.wait_for("/tasks/delete")
    exit_ = shim.events.decode("/tasks/exit", events_pb2.TaskExit)
    assert exit_.exit_status == 128 + signal.SIGKILL
    await task.Shutdown(task_pb2.ShutdownRequest(id=cid), timeout=10)


async def test_errors_from_the_shim_carry_grpc_codes(runc_shim: StartShim) -> None:
    shim, client = await runc_shim(["true"])
    task = client.stub(TASK)
    with pytest.raises(RpcError) as info:
        await task.Start(task_pb2.StartRequest(id=shim.id), timeout=10)
    assert info.value.code is Code.NOT_FOUND, info.value
    with pytest.raises(RpcError) as info:
        await client.call(
            TASK.full_name, "NoSuchMethod", empty_pb2.Empty(), empty_pb2.Empty, timeout=10
        )
    assert info.value.code is Code.UNIMPLEMENTED
    await task.Shutdown(task_pb2.ShutdownRequest(id=shim.id), timeout=10)
    with trio.fail_after(10):
        while shim.shim_pids():
            await trio.sleep(0.05)


async def test_a_dying_shim_fails_pending_calls(runc_shim: StartShim) -> None:
    """SIGKILL the shim daemon under a pending Wait: the call ends UNAVAILABLE, at once."""
    shim, client = await runc_shim(["sleep", "300"])
    task = client.stub(TASK)
    cid = shim.id
    await task.Create(
        task_pb2.CreateTaskRequest(
            id=cid,
            bundle=str(shim.bundle),
            stdout=str(shim.bundle / "stdout"),
            stderr=str(shim.bundle / "stderr"),
        ),
        timeout=30,
    )
    await task.Start(task_pb2.StartRequest(id=cid), timeout=30)
    (daemon,) = shim.shim_pids()

    outcome: list[BaseException] = []

    async def wait() -> None:
        try:
            await task.Wait(task_pb2.WaitRequest(id=cid), timeout=30)
        except RpcError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(0.2)
        start = trio.current_time()
        os.kill(daemon, signal.SIGKILL)
    assert trio.current_time() - start < 5
    (error,) = outcome
    assert isinstance(error, ConnectionClosed), repr(error)
    assert error.code is Code.UNAVAILABLE
    with pytest.raises(ConnectionClosed):
        await task.State(task_pb2.StateRequest(id=cid), timeout=5)
    # the container outlives its shim; the fixture's `shim delete` must reclaim it
    assert (RUNC_STATE_ROOT / shim.namespace / cid).exists()
