"""The VM pool's parts above QEMU: messages, the hand-over of a state dir, the daemon's choices.

The daemon is driven with fake members (a socketpair and a stand-in process);
the real members, QEMU and containerd are in tests/integration/test_pool.py.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shim.config import load
from shim.containerd import launch
from shim.containerd.launch import ShimArgs
from shim.errors import InvalidArgumentError
from shim.hypervisor import SharedFsDevice, VmSpec
from shim.pool import protocol
from shim.pool.channel import Channel
from shim.pool.claim import PoolClaim
from shim.pool.daemon import PoolDaemon
from shim.pool.member import relocate_state, relocated_spec
from shim.pool.protocol import PoolProtocolError
from shim.resources import DIR, PROCESS, SOCKET_FILE, Resource
from shim.rotating_log import RotatingLog
from shim.sandbox.state import SandboxState

# ---- messages ----


def test_a_message_is_one_json_line_and_reads_back() -> None:
    line = protocol.encode({"op": "claim", "id": "a"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == {"op": "claim", "id": "a"}


@pytest.mark.parametrize("line", [b"{not json", b"[1, 2]", b'"text"'])
def test_a_line_that_is_not_a_json_object_is_refused(line: bytes) -> None:
    with pytest.raises(PoolProtocolError):
        protocol.decode(line)


async def test_a_channel_reads_messages_split_and_joined_and_none_at_the_end() -> None:
    left, right = trio.testing.memory_stream_pair()
    channel = Channel(right)
    data = protocol.encode({"a": 1}) + protocol.encode({"b": 2})
    await left.send_all(data[:5])
    await left.send_all(data[5:])
    assert await channel.receive() == {"a": 1}
    assert await channel.receive() == {"b": 2}
    await left.aclose()
    assert await channel.receive() is None


async def test_a_channel_refuses_a_line_without_end() -> None:
    left, right = trio.testing.memory_stream_pair()
    channel = Channel(right)
    await left.send_all(b"x" * (protocol.MAX_LINE + 10))
    with pytest.raises(PoolProtocolError, match="longer than"):
        await channel.receive()


# ---- the hand-over of a pool VM's state dir ----


def _pool_state(root: Path) -> SandboxState:
    state = SandboxState.create(root, "pool-0123")
    state.record(Resource(DIR, path=str(state.dir / "qemu")))
    state.record(Resource(SOCKET_FILE, path=str(state.dir / "qemu" / "qmp.sock")))
    state.record(Resource(PROCESS, pid=42, start=7, name="qemu"))
    state.record(Resource(SOCKET_FILE, path="/elsewhere/x.sock"))
    state.set_debug_console({"kind": "serial", "path": str(state.dir / "qemu" / "debug.sock")})
    state.set_status("pooled")
    (state.dir / "qemu").mkdir()
    return state


def test_relocating_renames_the_dir_and_rewrites_every_path_in_the_record(tmp_path: Path) -> None:
    state = _pool_state(tmp_path)
    old = relocate_state(state, "sandbox-1", "k8s.io")
    assert old == tmp_path / "pool-0123" and not old.exists()
    assert state.dir == tmp_path / "sandbox-1" and (state.dir / "qemu").is_dir()
    reread = SandboxState.load(tmp_path / "sandbox-1")
    assert (reread.id, reread.namespace, reread.status) == ("sandbox-1", "k8s.io", "booting")
    paths = [r.path for r in reread.resources]
    assert paths == [
        str(state.dir / "qemu"),
        str(state.dir / "qemu" / "qmp.sock"),
        "",
        "/elsewhere/x.sock",  # not under the old dir: left as it was
    ]
    assert reread.debug_console["path"] == str(state.dir / "qemu" / "debug.sock")


def test_relocating_never_replaces_another_sandboxs_dir(tmp_path: Path) -> None:
    state = _pool_state(tmp_path)
    taken = tmp_path / "sandbox-1"
    taken.mkdir()  # empty: a plain rename(2) would replace it
    with pytest.raises(FileExistsError):
        relocate_state(state, "sandbox-1", "default")
    assert state.dir == tmp_path / "pool-0123" and state.dir.exists()


def test_relocating_refuses_an_id_that_leads_elsewhere(tmp_path: Path) -> None:
    state = _pool_state(tmp_path)
    with pytest.raises(InvalidArgumentError):
        relocate_state(state, "../escape", "default")
    assert state.dir.exists()


def test_the_relocated_spec_names_the_new_dir_and_share(
    tmp_path: Path,
) -> None:
    state = _pool_state(tmp_path)
    spec = VmSpec(
        sandbox_id=state.id,
        state_dir=state.dir,
        vcpus=1,
        memory_mib=512,
        kernel=tmp_path / "k",
        initrd=None,
        shared_fs=SharedFsDevice("share", "kataShared", state.shared_dir),
    )
    moved = relocated_spec(spec, "s2", tmp_path / "s2")
    assert (moved.sandbox_id, moved.state_dir) == ("s2", tmp_path / "s2")
    assert moved.shared_fs is not None and moved.shared_fs.path == tmp_path / "s2" / "shared"


def test_a_rotating_log_keeps_writing_and_rotating_after_its_dir_is_renamed(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    log = RotatingLog(tmp_path / "a" / "qemu.log", cap=10)
    log.write(b"12345")
    (tmp_path / "a").rename(tmp_path / "b")
    log.write(b"6789012345")
    log.close()
    assert (tmp_path / "b" / "qemu.log.1").read_bytes() == b"1234567890"
    assert (tmp_path / "b" / "qemu.log").read_bytes() == b"12345"
    assert not (tmp_path / "a").exists()


# ---- the daemon, with fake members ----


class FakeProcess:
    """What the daemon uses of a member's ``trio.Process``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = trio.Event()

    async def wait(self) -> int:
        await self._done.wait()
        return 0

    def end(self) -> None:
        self.returncode = 0
        self._done.set()


class FakeMembers:
    """Spawns fake members; the test holds the members' ends of their channels."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Channel, FakeProcess]] = []
        self.spawned = trio.Event()

    async def spawn(self, config: object, member_id: str) -> tuple[Any, Channel]:
        ours, theirs = socket.socketpair()
        process = FakeProcess(1_000_000 + len(self.started))
        self.started.append(
            (member_id, Channel(trio.SocketStream(trio.socket.from_stdlib_socket(theirs))), process)
        )
        self.spawned.set()
        return process, Channel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))

    async def wait_for(self, count: int) -> None:
        while len(self.started) < count:
            self.spawned = trio.Event()
            await self.spawned.wait()


def _config(tmp_path: Path, size: int = 2) -> Any:
    path = tmp_path / "husk.toml"
    path.write_text(
        f'[runtime]\nstate_dir = "{tmp_path}/state"\n'
        f'[factory]\nvm_cache_number = {size}\nvm_cache_endpoint = "{tmp_path}/pool.sock"\n'
    )
    return load(path)


def _claim(config: Any, sandbox_id: str = "sb1") -> dict[str, Any]:
    return {"op": "claim", "id": sandbox_id, "config": str(config.source)}


async def _ready(member: tuple[str, Channel, FakeProcess]) -> None:
    await member[1].send({"event": "ready", "vmm_pid": None, "cloned": True})


async def _settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_the_daemon_boots_its_vms_one_at_a_time_up_to_the_size(tmp_path: Path) -> None:
    fakes = FakeMembers()
    daemon = PoolDaemon(_config(tmp_path, size=3), spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for count in (1, 2, 3):
            await fakes.wait_for(count)
            await _settle()
            assert len(fakes.started) == count and daemon.status()["booting"] == 1
            await _ready(fakes.started[-1])
        await _settle()
        assert len(fakes.started) == 3 and daemon.status()["ready"] == 3
        daemon.stop()
        for _, _, process in fakes.started:
            process.end()
    assert not (tmp_path / "pool.sock").exists()


async def test_a_claim_with_no_ready_vm_is_a_miss_that_says_why(tmp_path: Path) -> None:
    fakes = FakeMembers()
    config = _config(tmp_path)
    daemon = PoolDaemon(config, spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await fakes.wait_for(1)
        answer = await daemon.claim(_claim(config))
        assert answer == {"ok": False, "reason": "none of its 2 VMs is ready (1 booting)"}
        assert daemon.misses == 1
        daemon.stop()
        for _, _, process in fakes.started:
            process.end()


async def test_a_claim_goes_to_the_longest_ready_vm_which_leaves_the_pool(
    tmp_path: Path,
) -> None:
    fakes = FakeMembers()
    config = _config(tmp_path)
    daemon = PoolDaemon(config, spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await fakes.wait_for(1)
        await _ready(fakes.started[0])
        await fakes.wait_for(2)
        await _ready(fakes.started[1])
        await _settle()
        first = fakes.started[0]  # ready longest

        request_went_to = []

        async def member_answers() -> None:
            request = await first[1].receive()
            assert request is not None and request["id"] == "sb1"
            request_went_to.append(first[0])
            await first[1].send({"event": "claimed", "socket": "/run/x/sb1/shim.sock"})
            await first[1].aclose()

        nursery.start_soon(member_answers)
        answer = await daemon.claim(_claim(config))
        assert answer == {"ok": True, "socket": "/run/x/sb1/shim.sock"}
        assert request_went_to == [first[0]]
        assert daemon.hits == 1
        await fakes.wait_for(3)  # the pool boots the next
        assert first[0] not in daemon.members and len(daemon.members) == 2
        daemon.stop()
        for _, _, process in fakes.started:
            process.end()


async def test_a_claim_for_another_config_is_refused(tmp_path: Path) -> None:
    fakes = FakeMembers()
    config = _config(tmp_path)
    daemon = PoolDaemon(config, spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for count in (1, 2):
            await fakes.wait_for(count)
            await _ready(fakes.started[-1])
        await _settle()
        answer = await daemon.claim({"op": "claim", "id": "x", "config": "/other.toml"})
        assert not answer["ok"] and "not /other.toml" in answer["reason"]
        assert daemon.status()["ready"] == 2  # no VM was spent on it
        daemon.stop()
        for _, _, process in fakes.started:
            process.end()


async def test_a_member_that_fails_before_ready_is_counted_and_replaced_after_a_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fakes = FakeMembers()
    daemon = PoolDaemon(_config(tmp_path, size=1), spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await fakes.wait_for(1)
        _, channel, process = fakes.started[0]
        await channel.send({"event": "failed", "reason": "no image"})
        await channel.aclose()
        process.end()
        started = trio.current_time()
        await fakes.wait_for(2)
        assert trio.current_time() - started >= 1.0  # not in a tight loop
        assert daemon.failures == 1
        daemon.stop()
        for _, _, p in fakes.started:
            p.end()


async def test_stopping_closes_the_unclaimed_members_channels(tmp_path: Path) -> None:
    fakes = FakeMembers()
    daemon = PoolDaemon(_config(tmp_path, size=1), spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await fakes.wait_for(1)
        _, channel, process = fakes.started[0]
        await _ready(fakes.started[0])
        await _settle()
        daemon.stop()
        assert await channel.receive() is None  # the member's cue to tear its VM down
        process.end()


async def test_status_and_claims_are_served_at_the_endpoint(tmp_path: Path) -> None:
    fakes = FakeMembers()
    config = _config(tmp_path, size=1)
    daemon = PoolDaemon(config, spawn=fakes.spawn)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await fakes.wait_for(1)
        status = await trio.to_thread.run_sync(
            protocol.request, tmp_path / "pool.sock", {"op": "status"}, 5.0
        )
        assert status["ok"] and status["size"] == 1 and status["booting"] == 1
        assert (tmp_path / "pool.sock").stat().st_mode & 0o777 == 0o600
        args = ShimArgs("default", "", "", "sb9", str(tmp_path), False)
        claim = PoolClaim(config, args)
        assert await trio.to_thread.run_sync(claim) is None
        assert "none of its 1 VMs is ready" in claim.miss and claim.miss.endswith("booting cold")
        daemon.stop()
        for _, _, process in fakes.started:
            process.end()


def test_a_start_with_no_pool_running_says_so_once(tmp_path: Path) -> None:
    config = _config(tmp_path)
    claim = PoolClaim(config, ShimArgs("default", "", "", "sb1", str(tmp_path), False))
    assert claim() is None
    assert claim.miss == f"no VM pool at {tmp_path}/pool.sock; starting the VM booting cold"


def owner_bundle(tmp_path: Path) -> Path:
    """A bundle whose container owns its sandbox (no CRI annotations)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({}))
    return bundle


def test_start_publishes_the_claimed_shims_socket_without_forking(tmp_path: Path) -> None:
    bundle = owner_bundle(tmp_path)
    claimed = tmp_path / "state" / "c1" / "shim.sock"

    def serve() -> int:
        raise AssertionError("no shim is forked when the pool's VM serves")

    args = ShimArgs("default", "", "", "c1", str(bundle), False)
    address = launch.start(args, tmp_path / "state", "pod", serve, lambda: claimed)
    assert address == f"unix://{claimed}"
    assert (bundle / "address").read_text() == address


def test_the_systemd_unit_runs_the_daemon_and_stops_only_it() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parents[2] / "packaging" / "husk-vm-cache.service")
    assert unit["Service"]["ExecStart"].endswith("husk factory init --foreground")
    # claimed pool VMs serve sandboxes from the unit's cgroup: a stop must not kill them
    assert unit["Service"]["KillMode"] == "process"


def test_a_pool_vm_that_died_taking_the_sandbox_over_is_reclaimed_before_start_goes_on(
    tmp_path: Path,
) -> None:
    import subprocess

    from shim.resources import process_start_time

    bundle = owner_bundle(tmp_path)
    state_root = tmp_path / "state"
    vmm = subprocess.Popen(["sleep", "600"])  # the member's VMM, still running after it

    def claim_that_renamed_then_died() -> Path | None:
        left = SandboxState.create(state_root, "c1")  # renamed into the sandbox's place
        left.shim_pid, left.shim_start = 2**22 + 12345, 1  # and then its member died
        left.record(Resource(PROCESS, pid=vmm.pid, start=process_start_time(vmm.pid), name="qemu"))
        return None

    args = ShimArgs("default", "", "", "c1", str(bundle), False)
    address = launch.start(args, state_root, "pod", lambda: 0, claim_that_renamed_then_died)
    assert address == f"unix://{state_root / 'c1' / 'shim.sock'}"
    assert vmm.wait(timeout=10) != 0  # killed with the failed hand-over's dir
    assert Resource(PROCESS, pid=vmm.pid) not in SandboxState.load(state_root / "c1").resources


def test_the_exercise_names_the_busybox_the_image_build_writes() -> None:
    from guest.image.manifest import BUSYBOX_NAME as built
    from shim.pool.exercise import BUSYBOX_NAME as used

    assert used == built


def test_a_start_that_claims_from_the_pool_loads_no_trio() -> None:
    import subprocess
    import sys

    code = "import sys, shim.containerd.main, shim.pool.claim; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_pool_of_a_plugin_that_cannot_hand_a_vm_over_is_refused_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from shim.pool import daemon

    path = tmp_path / "husk.toml"
    path.write_text(
        '[runtime]\nhypervisor = "cloud-hypervisor"\n'
        f'state_dir = "{tmp_path}/state"\n'
        f'[factory]\nvm_cache_number = 1\nvm_cache_endpoint = "{tmp_path}/pool.sock"\n'
    )
    assert daemon.main([str(path)]) == 1
    assert "the cloud-hypervisor plugin cannot hand a running VM over" in caplog.text
    assert not (tmp_path / "pool.sock").exists()


def test_a_pool_vm_that_answers_its_claim_late_is_still_the_sandboxs_shim(
    tmp_path: Path,
) -> None:
    bundle = owner_bundle(tmp_path)
    state_root = tmp_path / "state"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def claim_answered_too_late() -> Path | None:
        late = SandboxState.create(state_root, "c1")
        late.claim(os.getpid())  # the member: alive
        listener.bind(str(late.socket))
        listener.listen(1)
        return None

    def serve() -> int:
        raise AssertionError("no second shim for a sandbox a pool VM serves")

    args = ShimArgs("default", "", "", "c1", str(bundle), False)
    try:
        address = launch.start(args, state_root, "pod", serve, claim_answered_too_late)
    finally:
        listener.close()
    assert address == f"unix://{state_root / 'c1' / 'shim.sock'}"


def test_a_pool_vm_that_hangs_in_its_hand_over_is_killed_and_its_place_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from shim.resources import process_start_time

    monkeypatch.setattr(launch, "HANDOVER_SETTLE", 0.5)
    bundle = owner_bundle(tmp_path)
    state_root = tmp_path / "state"
    member = subprocess.Popen(["sleep", "600"])  # alive, never answers

    def claim_that_hangs() -> Path | None:
        hung = SandboxState.create(state_root, "c1")
        hung.shim_pid, hung.shim_start = member.pid, process_start_time(member.pid)
        hung.save()
        return None

    args = ShimArgs("default", "", "", "c1", str(bundle), False)
    launch.start(args, state_root, "pod", lambda: 0, claim_that_hangs)
    assert member.wait(timeout=10) != 0
    assert SandboxState.load(state_root / "c1").shim_pid != member.pid
