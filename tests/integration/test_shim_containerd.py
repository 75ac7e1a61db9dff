"""containerd → containerd-shim-husk-v2 → QEMU sandbox → guest agent, end to end.

A real containerd on a temp root runs ``ctr run --runtime io.containerd.husk.v2``
with a busybox image made locally from Debian's busybox-static, once per
containerd release of the matrix (``test_x[1.6]``, ``[1.7]``, ``[2.4]``): each
speaks its own shim protocol (``start``'s stdin and output, task API v2 or
v3, ``-info``) and writes its own runtime-spec version. After every test no
QEMU process, socket, mount or state dir of a sandbox is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import config, registry
from shim.cli import local_images
from shim.errors import NotSupportedError
from shim.host import HostFacts
from shim.sandbox import cleanup
from shim.sandbox.state import SandboxState
from tests.integration.containerd import CTR_ENV, Containerd, sandbox_dirs
from tests.integration.containerd_versions import ContainerdBinaries

IMAGE = local_images.BUSYBOX_REFERENCE
RUNTIME = ["--runtime", "io.containerd.husk.v2"]


#: the plugin under test; another one (e.g. a host-mode agent stand-in registered
#: through PYTHONPATH) only while developing the shim without a VM
HYPERVISOR = os.environ.get("HUSK_TEST_HYPERVISOR", "qemu")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (containerd, mounts, QEMU)"
    if not shutil.which("containerd") or not shutil.which("ctr"):
        return "containerd is not installed"
    cfg = config.load(Path(__file__).parents[2] / "configuration.toml")
    plugin = registry.lookup(HYPERVISOR)
    section = cfg.hypervisors.get(HYPERVISOR, {})
    problems = plugin.unmet_requirements(section, HostFacts.probe())
    if problems:
        return "; ".join(problems)
    try:
        plugin.create(section)
    except NotSupportedError as e:
        return str(e)
    return None


pytestmark = [pytest.mark.integration]
_REASON = _skip_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="husk-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def husk_config(state_root: Path, shared_template: str) -> Iterator[Path]:
    path = state_root.with_name(state_root.name + ".toml")
    path.write_text(
        f'[runtime]\nstate_dir = "{state_root}"\nhypervisor = "{HYPERVISOR}"\n{shared_template}'
    )
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ctd(husk_config: Path, containerd_binaries: ContainerdBinaries) -> Iterator[Containerd]:
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {"HUSK_CONFIG": str(husk_config)}, containerd_binaries)
    tarball = base / "busybox.tar"
    local_images.build_busybox(tarball)
    daemon.ctr("image", "import", str(tarball))
    yield daemon
    daemon.stop()


def leftovers(state_root: Path) -> list[str]:
    found = [f"state dir {p}" for p in sandbox_dirs(state_root)]
    found += [f"process {pid}" for pid in cleanup.processes_naming(state_root)]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(state_root) in line.split()[4]]
    return found


@pytest.fixture(autouse=True)
def nothing_left(state_root: Path) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 15
    while leftovers(state_root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(state_root) == []


def cid() -> str:
    return "t-" + uuid.uuid4().hex[:10]


def run(ctd: Containerd, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return ctd.ctr("run", *RUNTIME, "--rm", IMAGE, cid(), *args, **kw)  # type: ignore[arg-type]


def test_guest_kernel_answers_uname(ctd: Containerd) -> None:
    out = run(ctd, "uname", "-r").stdout.decode().strip()
    assert out and out != platform.release()


def test_rootfs_is_the_images(ctd: Containerd) -> None:
    out = run(ctd, "sh", "-c", "cat /etc/hostname; ls /bin/busybox").stdout.decode()
    assert out.split() == ["busybox", "/bin/busybox"]


def test_exit_code_comes_back(ctd: Containerd) -> None:
    proc = run(ctd, "sh", "-c", "exit 7", check=False)
    assert proc.returncode == 7


def test_stdin_env_cwd(ctd: Containerd) -> None:
    proc = ctd.ctr(
        "run", *RUNTIME, "--rm", "--env", "FOO=bar", "--cwd", "/tmp", IMAGE, cid(),
        "sh", "-c", 'cat; echo "$FOO"; pwd', input=b"from-stdin\n",
    )  # fmt: skip
    assert proc.stdout.decode().split() == ["from-stdin", "bar", "/tmp"]


def test_two_mib_stdout_matches_runc_and_stderr_is_apart(ctd: Containerd) -> None:
    script = "head -c 2097152 /dev/zero | tr '\\0' 'x'; seq 1 1000; echo err-line >&2"
    husk = ctd.ctr("run", *RUNTIME, "--rm", IMAGE, cid(), "sh", "-c", script)
    runc = ctd.ctr("run", "--rm", IMAGE, cid(), "sh", "-c", script)
    assert len(husk.stdout) == len(runc.stdout) > 2 * 1024 * 1024
    assert hashlib.sha256(husk.stdout).digest() == hashlib.sha256(runc.stdout).digest()
    assert husk.stderr.strip() == b"err-line"


def test_exec_ls_pause_resume_kill(ctd: Containerd) -> None:
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "1000")
    try:
        assert f"{name}" in ctd.ctr("task", "ls").stdout.decode()
        assert _status(ctd, name) == "RUNNING"
        out = ctd.ctr("task", "exec", "--exec-id", "e1", name, "sh", "-c", "echo in-exec; exit 3",
                      check=False)  # fmt: skip
        assert (out.returncode, out.stdout.strip()) == (3, b"in-exec")
        ctd.ctr("task", "pause", name)
        assert _status(ctd, name) == "PAUSED"
        ctd.ctr("task", "resume", name)
        assert _status(ctd, name) == "RUNNING"
        ctd.ctr("task", "kill", name)
        deadline = time.monotonic() + 30
        while _status(ctd, name) != "STOPPED" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _status(ctd, name) == "STOPPED"
    finally:
        ctd.ctr("task", "delete", "-f", name, check=False)
        ctd.ctr("container", "rm", name, check=False)


def _status(ctd: Containerd, name: str) -> str:
    for line in ctd.ctr("task", "ls").stdout.decode().splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return fields[-1]
    return ""


def test_tty_session(ctd: Containerd) -> None:
    command = (
        f"stty cols 91 rows 27; {ctd.binaries.ctr} --address {ctd.address} run "
        f"{' '.join(RUNTIME)} -t --rm "
        f"{IMAGE} {cid()} sh -c 'tty; stty size'"
    )
    proc = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        timeout=120,
        check=False,
        env=CTR_ENV,
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "/dev/pts/" in out


def test_two_sandboxes_at_once(ctd: Containerd, state_root: Path) -> None:
    a, b = cid(), cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, a, "sleep", "1000")
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, b, "sleep", "1000")
    try:
        assert {p.name for p in sandbox_dirs(state_root)} == {a, b}
        assert len(cleanup.processes_naming(state_root / a)) >= 1
        assert len(cleanup.processes_naming(state_root / b)) >= 1
    finally:
        for name in (a, b):
            ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
            ctd.ctr("task", "delete", "-f", name, check=False)
            ctd.ctr("container", "rm", name, check=False)


def _pod_annotations(kind: str, pod: str) -> list[str]:
    return [
        "--annotation", f"io.kubernetes.cri.container-type={kind}",
        "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
    ]  # fmt: skip


def _boot_id(ctd: Containerd, name: str, exec_id: str) -> str:
    argv = ["cat", "/proc/sys/kernel/random/boot_id"]
    return ctd.ctr("task", "exec", "--exec-id", exec_id, name, *argv).stdout.decode().strip()


def test_containers_of_a_pod_share_one_sandbox_vm(ctd: Containerd, state_root: Path) -> None:
    pod, app = cid(), cid()
    ctd.ctr("run", *RUNTIME, "-d", *_pod_annotations("sandbox", pod), IMAGE, pod, "sleep", "1000")
    try:
        ctd.ctr("run", *RUNTIME, "-d", *_pod_annotations("container", pod),
                IMAGE, app, "sleep", "1000")  # fmt: skip
        # one VM: one sandbox dir, one QEMU, one guest kernel boot for both
        assert {p.name for p in sandbox_dirs(state_root)} == {pod}
        assert _boot_id(ctd, pod, "b1") == _boot_id(ctd, app, "b2")
        assert sorted(_status(ctd, n) for n in (pod, app)) == ["RUNNING", "RUNNING"]
        ctd.ctr("task", "kill", "-s", "SIGKILL", app)
        ctd.ctr("task", "delete", app)
        ctd.ctr("container", "rm", app)
        assert _status(ctd, pod) == "RUNNING"  # the pod's VM outlives its app container
    finally:
        for name in (app, pod):
            ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
            ctd.ctr("task", "delete", "-f", name, check=False)
            ctd.ctr("container", "rm", name, check=False)


def test_killed_shim_then_task_delete_removes_the_vm(ctd: Containerd, state_root: Path) -> None:
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "1000")
    shim_pid = SandboxState.load(state_root / name).shim_pid
    vms = cleanup.processes_naming(state_root / name)
    assert vms
    os.kill(shim_pid, signal.SIGKILL)
    time.sleep(1)
    ctd.ctr("task", "delete", name, check=False)
    ctd.ctr("container", "rm", name, check=False)
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{p}") for p in vms) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in vms)


def test_missing_kernel_fails_in_one_line_and_leaves_nothing(
    containerd_factory: object, containerd_binaries: ContainerdBinaries, tmp_path: Path
) -> None:
    root = Path(tempfile.mkdtemp(prefix="husk-", dir="/tmp"))
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        f'[runtime]\nstate_dir = "{root}"\n[hypervisor.qemu]\nkernel = "/nonexistent/vmlinuz"\n'
    )
    env = {"HUSK_CONFIG": str(cfg)}
    daemon: Containerd = containerd_factory(env, containerd_binaries)  # type: ignore[operator]
    tarball = daemon.base / "busybox.tar"
    local_images.build_busybox(tarball)
    daemon.ctr("image", "import", str(tarball))
    proc = daemon.ctr("run", *RUNTIME, "--rm", IMAGE, cid(), "true", check=False)
    message = proc.stderr.decode()
    assert proc.returncode != 0
    assert "/nonexistent/vmlinuz" in message and len(message.strip().splitlines()) == 1
    time.sleep(1)
    assert sandbox_dirs(root) == []
    assert cleanup.processes_naming(root) == []
    shutil.rmtree(root, ignore_errors=True)


def test_a_rw_bind_volume_is_shared_both_ways(ctd: Containerd, tmp_path: Path) -> None:
    volume = tmp_path / "rw"
    volume.mkdir()
    (volume / "in").write_text("from-host\n")
    mount = f"type=bind,src={volume},dst=/vol,options=rbind:rw"
    script = "cat /vol/in; echo from-guest > /vol/out"
    out = ctd.ctr("run", *RUNTIME, "--rm", "--mount", mount, IMAGE, cid(), "sh", "-c", script)
    assert out.stdout.decode() == "from-host\n"
    assert (volume / "out").read_text() == "from-guest\n"


def test_a_ro_bind_volume_and_a_read_only_rootfs_refuse_writes(
    ctd: Containerd, tmp_path: Path
) -> None:
    volume = tmp_path / "ro"
    volume.mkdir()
    (volume / "in").write_text("readable\n")
    mount = f"type=bind,src={volume},dst=/vol,options=rbind:ro"
    script = (
        "cat /vol/in; touch /vol/x 2>/dev/null && echo vol-writable; "
        "touch /rootfs-x 2>/dev/null && echo rootfs-writable; echo done"
    )
    proc = ctd.ctr(
        "run", *RUNTIME, "--rm", "--read-only", "--mount", mount, IMAGE, cid(), "sh", "-c", script
    )
    assert proc.stdout.decode().split() == ["readable", "done"]
    assert sorted(p.name for p in volume.iterdir()) == ["in"]


# ---- what differs between containerd releases: runtime options, -info ----


def test_ctr_runtime_config_path_decides_the_sandboxs_config(
    ctd: Containerd, state_root: Path, shared_template: str
) -> None:
    # 1.x hands start the options as an Any, 2.3+ inside BootstrapParams' extensions
    other_root = Path(tempfile.mkdtemp(prefix="husk-", dir="/tmp"))
    other = other_root.with_name(other_root.name + ".toml")
    other.write_text(f'[runtime]\nstate_dir = "{other_root}"\n{shared_template}')
    name = cid()
    try:
        ctd.ctr("run", *RUNTIME, "--runtime-config-path", str(other), "-d", IMAGE, name,
                "sleep", "1000")  # fmt: skip
        assert [p.name for p in sandbox_dirs(other_root)] == [name]
        assert sandbox_dirs(state_root) == []
    finally:
        ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        ctd.ctr("task", "delete", "-f", name, check=False)
        ctd.ctr("container", "rm", name, check=False)
    assert leftovers(other_root) == []
    other.unlink()
    shutil.rmtree(other_root, ignore_errors=True)


@pytest.mark.containerd_lines("2.4")
def test_inspect_runtime_shows_husks_runtime_info(ctd: Containerd, husk_config: Path) -> None:
    out = ctd.ctr("plugins", "inspect-runtime", *RUNTIME,
                  "--runtime-config-path", str(husk_config)).stdout  # fmt: skip
    info = json.loads(out)
    assert info["Name"] == "io.containerd.husk.v2"
    assert info["Options"]["config_path"] == str(husk_config)
    assert info["Features"]["linux"]["mountExtensions"]["idmap"]["enabled"] is False


@pytest.mark.containerd_lines("2.4")
def test_an_idmapped_mount_is_refused_by_containerd_from_husks_features(
    ctd: Containerd, tmp_path: Path
) -> None:
    # containerd asks `-info` before a task with idmapped mounts: 9p cannot map ids
    mount = f"type=bind,src={tmp_path},dst=/vol,options=rbind:rw:idmap"
    proc = ctd.ctr("run", *RUNTIME, "--rm", "--mount", mount, IMAGE, cid(), "true", check=False)
    message = proc.stderr.decode().strip()
    assert proc.returncode != 0
    assert "idmap mounts not supported" in message and len(message.splitlines()) == 1
