"""A hostile guest gets nothing on the host: the attacks, end to end (containerd + QEMU).

The guest is hostile (Kata's threat model): a workload may break out of its
container into the guest kernel, and from there write anything the 9p share
lets it write. QEMU's 9p server (``security_model=none``) performs the
guest's file operations on the host *as root* on the exported tree, walking
it without following symlinks; so what the guest can plant in the share is
exactly what root can plant at the same host path, and the tests below do
that at the path QEMU exports. The sandbox must keep every such plant from
reaching outside its own directory.

1. setuid files and device nodes made in a container are never usable by an
   unprivileged host user;
2. a symlink planted where the host will next make a mount point (the next
   container of a pod, whose id a guest can predict) or where it will undo
   one (a volume's bind) never leads the host outside the sandbox's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import mounts
from plugins.qemu.process import QEMU_LOG_CAP
from shim.cli import local_images
from shim.sandbox import cleanup
from shim.sandbox.console import CONSOLE_CAP
from tests.integration.containerd import Containerd
from tests.integration.test_shim_containerd import RUNTIME, pytestmark  # noqa: F401

IMAGE = local_images.BUSYBOX_REFERENCE
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def probe_elf() -> bytes:
    """A static x86-64 program that exits with its effective uid (0 means root).

    Hand-assembled so no compiler is needed: ``geteuid(); exit(euid)``.
    """
    code = bytes.fromhex("b86b0000000f0589c7b83c0000000f05")
    base, header, phdr = 0x400000, 64, 56
    entry = base + header + phdr
    size = header + phdr + len(code)
    elf = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    elf += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, header, 0, 0, header, phdr, 1, 0, 0, 0)
    elf += struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return elf + code


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    """A state dir husk makes itself, below a world-traversable dir, as /run/husk is."""
    base = Path(tempfile.mkdtemp(prefix="husk-iso-", dir="/tmp"))
    base.chmod(0o755)
    yield base / "state"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def ctd(state_root: Path, shared_template: str) -> Iterator[Containerd]:
    config = state_root.parent / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state_root}"\n{shared_template}')
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {"HUSK_CONFIG": str(config)})
    daemon.ctr("image", "import", str(local_images.build_busybox(base / "busybox.tar")))
    yield daemon
    daemon.stop()


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A host directory no sandbox has any business touching."""
    path = tmp_path / "canary"
    path.mkdir()
    yield path
    for point in mounts.mounts_under(path):
        mounts.unmount(point)


def cid() -> str:
    return "i-" + uuid.uuid4().hex[:10]


def pod_annotations(kind: str, pod: str) -> list[str]:
    return [
        "--annotation", f"io.kubernetes.cri.container-type={kind}",
        "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
    ]  # fmt: skip


def remove_tasks(ctd: Containerd, *names: str) -> None:
    for name in names:
        ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        ctd.ctr("task", "delete", "-f", name, check=False)
        ctd.ctr("container", "rm", name, check=False)


def wait_in_guest(ctd: Containerd, name: str, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check = ["task", "exec", "--exec-id", uuid.uuid4().hex[:8], name, "test", "-e", path]
        if ctd.ctr(*check, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} never appeared in {name}")


def host_paths(root: Path, name: str) -> list[Path]:
    """Every host path under ``root`` that shows a file called ``name`` (root's view)."""
    found = []
    for directory, _, files in os.walk(root):
        if name in files:
            found.append(Path(directory) / name)
    return found


def plant_as_the_guest_would(action: str, *args: Path) -> OSError | None:
    """What a guest does through 9p, done as QEMU does it (root, at the exported path)."""
    try:
        if action == "symlink":
            os.symlink(args[0], args[1])
        elif action == "swap":  # a directory the host will walk, swapped for a symlink
            os.rename(args[1], args[1].with_name(args[1].name + ".moved"))
            os.symlink(args[0], args[1])
    except OSError as e:
        return e
    return None


def test_setuid_file_and_device_node_made_in_a_container_are_useless_on_the_host(
    ctd: Containerd, state_root: Path, tmp_path: Path
) -> None:
    source = tmp_path / "probe-src"
    source.mkdir()
    (source / "probe").write_bytes(probe_elf())
    (source / "probe").chmod(0o755)
    source.chmod(0o755)
    assert subprocess.run([*NOBODY, str(source / "probe")]).returncode == 254  # the probe works
    name = cid()
    script = (
        "cp /probe-src/probe /probe && chmod 4755 /probe && "
        # 9p may refuse the node (QEMU 7.2 answers ENXIO here); the host must hold either way
        "{ mknod -m 666 /null2 c 1 3 || touch /null2; } && touch /ready && sleep 600"
    )
    mount = f"type=bind,src={source},dst=/probe-src,options=rbind:ro"
    ctd.ctr("run", *RUNTIME, "-d", "--mount", mount, IMAGE, name, "sh", "-c", script)
    try:
        wait_in_guest(ctd, name, "/ready")
        probes = host_paths(state_root, "probe")
        nodes = host_paths(state_root, "null2")
        assert probes and nodes, "the container's rootfs is shared from the state dir"
        for probe in probes:
            run = subprocess.run([*NOBODY, str(probe)], capture_output=True)
            assert run.returncode != 0, f"user nobody ran {probe} with euid 0"
        for node in nodes:
            opened = subprocess.run([*NOBODY, "sh", "-c", f"echo x > {node}"], capture_output=True)
            assert opened.returncode != 0, f"user nobody opened {node}, made in the container"
    finally:
        remove_tasks(ctd, name)


def test_a_symlink_planted_for_the_next_container_of_a_pod_leads_nowhere(
    ctd: Containerd, state_root: Path, canary: Path
) -> None:
    pod, second = cid(), cid()
    (canary / "precious").write_text("keep")
    before = canary.stat().st_mtime_ns
    ctd.ctr("run", *RUNTIME, "-d", *pod_annotations("sandbox", pod), IMAGE, pod, "sleep", "600")
    try:
        refused = plant_as_the_guest_would("symlink", canary, state_root / pod / "shared" / second)
        proc = ctd.ctr(
            "run", *RUNTIME, "-d", *pod_annotations("container", pod), IMAGE, second,
            "sleep", "600", check=False,
        )  # fmt: skip
        assert [p.name for p in canary.iterdir()] == ["precious"], "the host wrote outside"
        assert canary.stat().st_mtime_ns == before, "the host created or removed outside"
        assert mounts.mounts_under(canary) == [], "the host mounted outside the sandbox"
        assert refused is not None or proc.returncode != 0
        if proc.returncode != 0:
            assert len(proc.stderr.decode().strip().splitlines()) == 1
    finally:
        remove_tasks(ctd, second, pod)


def test_a_volume_swapped_for_a_symlink_does_not_make_the_host_unmount_its_own_mounts(
    ctd: Containerd, state_root: Path, canary: Path, tmp_path: Path
) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    name = cid()
    mount = f"type=bind,src={volume},dst=/vol,options=rbind:rw"
    ctd.ctr("run", *RUNTIME, "-d", "--mount", mount, IMAGE, name, "sleep", "600")
    try:
        planted = state_root / name / "shared" / name / "mounts"
        # the guest reads the bind's name in the share, and the host has a mount of that name
        host_mount = canary / os.listdir(planted)[0]
        host_mount.mkdir()
        mounts.mount("tmpfs", host_mount, "tmpfs", ["size=1m"])
        refused = plant_as_the_guest_would("swap", canary, planted)
        remove_tasks(ctd, name)
        assert mounts.is_mount_point(host_mount), "the host unmounted a mount outside the sandbox"
        assert refused is not None or not planted.is_symlink()
    finally:
        remove_tasks(ctd, name)


def test_state_dirs_are_root_only(ctd: Containerd, state_root: Path) -> None:
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "600")
    try:
        for directory in (state_root, state_root / name):
            assert directory.stat().st_mode & 0o777 == 0o700, directory
    finally:
        remove_tasks(ctd, name)


def test_cleanup_after_a_killed_shim_reclaims_the_sandbox(
    ctd: Containerd, state_root: Path, tmp_path: Path
) -> None:
    volume = tmp_path / "vol2"
    volume.mkdir()
    name = cid()
    mount = f"type=bind,src={volume},dst=/vol,options=rbind:ro"
    ctd.ctr("run", *RUNTIME, "-d", "--mount", mount, IMAGE, name, "sleep", "600")
    from shim.sandbox.state import SandboxState

    shim = SandboxState.load(state_root / name).shim_pid
    os.kill(shim, 9)
    time.sleep(1)
    # containerd notices the dead shim and runs its `delete`; `husk cleanup` takes the rest
    _, problems = cleanup.reclaim_orphans(state_root)
    assert problems == []
    assert not (state_root / name).exists()
    assert mounts.mounts_under(state_root) == []
    assert cleanup.processes_naming(state_root) == []
    remove_tasks(ctd, name)


def test_a_console_flood_from_the_guest_stays_under_the_log_cap(
    ctd: Containerd, state_root: Path
) -> None:
    name = cid()
    # a guest that has the console (here a privileged container writing the serial port)
    flood = "yes husk-console-flood-line | head -c 3000000 > /dev/ttyS0; touch /flooded"
    ctd.ctr("run", *RUNTIME, "-d", "--privileged", IMAGE, name, "sh", "-c", f"{flood}; sleep 600")
    try:
        wait_in_guest(ctd, name, "/flooded", timeout=300)
        logs = list((state_root / name).rglob("console.log*"))
        sizes = {p.name: p.stat().st_size for p in logs}
        assert sum(sizes.values()) <= 2 * CONSOLE_CAP, sizes
        assert any("husk-console-flood-line" in p.read_text(errors="replace") for p in logs)
    finally:
        remove_tasks(ctd, name)


def qmp_command(sock: Path, command: str, arguments: dict[str, object] | None = None) -> object:
    """One QMP command on its own connection (the shim opens one per operation too)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock))
        lines = s.makefile("rb")
        lines.readline()  # the greeting
        for name, args in (("qmp_capabilities", None), (command, arguments)):
            s.sendall(
                json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode()
            )
            while "return" not in (reply := json.loads(lines.readline())):
                assert "error" not in reply, reply
        return reply["return"]


def test_a_flood_of_qemus_own_log_stays_under_the_log_cap(
    ctd: Containerd, state_root: Path
) -> None:
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "600")
    vm = state_root / name / "qemu"
    # what enable_debug's -d guest_errors,unimp writes, only far more of it: under TCG
    # 'exec' logs every translated block the guest runs (MiB a second)
    qmp_command(vm / "qmp.sock", "human-monitor-command", {"command-line": "log exec,nochain"})
    try:
        deadline = time.monotonic() + 120
        while not (vm / "qemu.log.1").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)  # the flood goes on past a rotation
    finally:
        qmp_command(vm / "qmp.sock", "human-monitor-command", {"command-line": "log none"})
    try:
        logs = list(vm.glob("qemu.log*"))
        sizes = {p.name: p.stat().st_size for p in logs}
        assert "qemu.log.1" in sizes, sizes
        assert all(size <= QEMU_LOG_CAP for size in sizes.values()), sizes
        assert "Trace" in (vm / "qemu.log.1").read_text(errors="replace")
        # the sandbox still answers
        check = ["task", "exec", "--exec-id", uuid.uuid4().hex[:8], name, "true"]
        assert ctd.ctr(*check, check=False).returncode == 0
    finally:
        remove_tasks(ctd, name)
