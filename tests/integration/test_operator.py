"""What an operator reaches for, against real containerd + QEMU: log URIs, the debug
console, metrics, versions and the sandbox list.

One pod sandbox VM (booted once for the module, with the debug console on)
hosts most tests: its app containers join it through the CRI annotations, so
each test costs a container, not a VM boot. The Create failures run as
standalone containers, to show they leave no sandbox behind. The log URI
tests run on every containerd of the matrix (containerd hands the URI to the
shim); husk's own commands (version, sandbox ls, exec, metrics) on the main one.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shim.cli import local_images
from shim.sandbox import cleanup
from shim.sandbox.state import SandboxState
from tests.integration.containerd import Containerd
from tests.integration.containerd_versions import ContainerdBinaries
from tests.integration.test_agent_secret_vm import (
    assert_no_command_line_shows,
    assert_root_only,
    spellings,
    what_nobody_gets,
)
from tests.integration.test_shim_containerd import _REASON

IMAGE = local_images.BUSYBOX_REFERENCE
RUNTIME = ["--runtime", "io.containerd.husk.v2"]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration]
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))

#: the pod's init fills 32 MiB of its /dev/shm (charged to its cgroup) before it sleeps
FILL = "head -c 33554432 /dev/zero > /dev/shm/fill && touch /tmp/filled && exec sleep 100000"
#: ctr's spec has no cgroup namespace here: the pod sees the guest's cgroup2 tree (read-only)
#: and reads its own cgroup's files under the path /proc/self/cgroup names
CGROUP_MOUNT = [
    "--mount",
    "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev",
]
OWN_MEMORY = "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.current"

LOGGER = """#!/bin/sh
# a containerd logging binary: stdout on fd 3, stderr on fd 4, ready pipe on fd 5
out={out}
echo $$ > "$out/pid"
env > "$out/env"
cat <&3 5>&- > "$out/stdout" &
cat <&4 5>&- > "$out/stderr" &
exec 5>&-
wait
"""


def cid() -> str:
    return "o-" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="husk-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def husk_config(state_root: Path) -> Iterator[Path]:
    path = state_root.with_name(state_root.name + ".toml")
    path.write_text(f'[runtime]\nstate_dir = "{state_root}"\n[agent.husk]\ndebug_console = true\n')
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


def annotations(kind: str, pod: str) -> list[str]:
    return [
        "--annotation", f"io.kubernetes.cri.container-type={kind}",
        "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
    ]  # fmt: skip


def remove(ctd: Containerd, *names: str) -> None:
    for name in names:
        ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        ctd.ctr("task", "delete", "-f", name, check=False)
        ctd.ctr("container", "rm", name, check=False)


@pytest.fixture(scope="module")
def pod(ctd: Containerd, state_root: Path) -> Iterator[str]:
    """A running pod sandbox VM whose init holds 32 MiB of shared memory."""
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", *annotations("sandbox", name), *CGROUP_MOUNT, IMAGE, name,
            "sh", "-c", FILL)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = ctd.ctr("task", "exec", "--exec-id", "f" + uuid.uuid4().hex[:6], name,
                       "test", "-e", "/tmp/filled", check=False)  # fmt: skip
        if done.returncode == 0:
            break
        time.sleep(0.5)
    yield name
    remove(ctd, name)
    deadline = time.monotonic() + 30
    while (state_root / name).exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def run_in_pod(
    ctd: Containerd, pod: str, *args: str, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return ctd.ctr("run", *RUNTIME, "--rm", *annotations("container", pod), *args, **kw)  # type: ignore[arg-type]


def test_file_log_uri_receives_stdout_and_stderr(ctd: Containerd, pod: str, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "app.log"
    run_in_pod(ctd, pod, "--log-uri", f"file://{log}", IMAGE, cid(),
               "sh", "-c", "echo to-stdout; echo to-stderr >&2")  # fmt: skip
    assert sorted(log.read_text().splitlines()) == ["to-stderr", "to-stdout"]


def test_binary_logger_receives_both_streams_and_is_gone_after_delete(
    ctd: Containerd, pod: str, tmp_path: Path
) -> None:
    logger = tmp_path / "logger"
    logger.write_text(LOGGER.format(out=tmp_path))
    logger.chmod(0o755)
    name = cid()
    run_in_pod(ctd, pod, "--log-uri", f"binary://{logger}", IMAGE, name,
               "sh", "-c", "echo to-stdout; echo to-stderr >&2")  # fmt: skip
    assert (tmp_path / "stdout").read_text() == "to-stdout\n"
    assert (tmp_path / "stderr").read_text() == "to-stderr\n"
    env = (tmp_path / "env").read_text().splitlines()
    assert f"CONTAINER_ID={name}" in env and "CONTAINER_NAMESPACE=default" in env
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}")  # `run --rm` deleted the task: logger reaped


def test_exec_log_uri_sends_the_exec_output_to_the_file(
    ctd: Containerd, pod: str, tmp_path: Path
) -> None:
    log = tmp_path / "exec.log"
    ctd.ctr("task", "exec", "--exec-id", "x1", "--log-uri", f"file://{log}", pod,
            "sh", "-c", "echo exec-out; echo exec-err >&2")  # fmt: skip
    assert sorted(log.read_text().splitlines()) == ["exec-err", "exec-out"]


def _create_fails(ctd: Containerd, state_root: Path, uri: str) -> str:
    name = cid()
    proc = ctd.ctr("run", *RUNTIME, "--rm", "--log-uri", uri, IMAGE, name, "true", check=False)
    message = proc.stderr.decode()
    assert proc.returncode != 0
    assert len(message.strip().splitlines()) == 1, message
    deadline = time.monotonic() + 20
    while (state_root / name).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (state_root / name).exists()
    assert cleanup.processes_naming(state_root / name) == []
    ctd.ctr("container", "rm", name, check=False)
    return message


def test_a_logger_that_exits_early_fails_create_and_leaves_nothing(
    ctd: Containerd, state_root: Path, tmp_path: Path
) -> None:
    quitter = tmp_path / "quitter"
    quitter.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexit 3\n")
    quitter.chmod(0o755)
    message = _create_fails(ctd, state_root, f"binary://{quitter}")
    assert "exited with status 3 before it was ready" in message
    assert not os.path.exists(f"/proc/{int((tmp_path / 'pid').read_text())}")


def test_a_missing_logger_binary_fails_create_and_leaves_nothing(
    ctd: Containerd, state_root: Path
) -> None:
    message = _create_fails(ctd, state_root, "binary:///nonexistent/logger")
    assert "/nonexistent/logger cannot start" in message


@pytest.mark.main_containerd_only  # husk's own commands: no containerd in between
def test_husk_version_matches_the_shims(ctd: Containerd) -> None:
    husk = subprocess.run([BIN / "husk", "--version"], capture_output=True, text=True, check=True)
    shim = subprocess.run([BIN / "containerd-shim-husk-v2", "-v"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert husk.stdout == shim.stdout and "guest kernel " in husk.stdout


@pytest.mark.main_containerd_only  # husk's own commands: no containerd in between
def test_sandbox_ls_lists_the_running_pod(pod: str, husk_config: Path) -> None:
    out = subprocess.run([BIN / "husk", "--config", str(husk_config), "sandbox", "ls"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[pod][1] == "qemu" and rows[pod][-1] == "running"
    assert int(rows[pod][-2]) >= 1
    state = SandboxState.load(Path(husk_config.read_text().split('"')[1]) / pod)
    assert state.vcpus >= 1 and state.memory_mib >= 64


def test_the_sandbox_secret_is_root_only_and_in_no_command_line_or_record(
    pod: str, state_root: Path
) -> None:
    sandbox = state_root / pod
    secret_file = sandbox / "qemu" / "agent.secret"
    assert_root_only(secret_file)
    secret = secret_file.read_bytes()
    assert_no_command_line_shows(secret)  # the shim's, QEMU's, containerd's, anyone's
    record = (sandbox / "sandbox.json").read_bytes()
    assert all(spelling not in record for spelling in spellings(secret))
    sockets = [sandbox / "qemu" / name for name in ("agent.sock", "debug-console.sock")]
    got = what_nobody_gets(secret_file, *sockets, sandbox / "shim.sock")
    assert set(got.values()) == {"Permission denied"}, got


def husk(husk_config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "husk", "--config", str(husk_config), *args],
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip


class Terminal:
    """`husk exec` on a pty, typed into and read like a person would."""

    def __init__(self, argv: list[str], rows: int, columns: int) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: husk exec on the pty
            os.execv(argv[0], argv)
        self.resize(rows, columns)
        self.seen = b""
        self.mark = 0

    def resize(self, rows: int, columns: int) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def type(self, text: str) -> None:
        """Type ``text``; ``expect`` then looks only at what the screen shows after it."""
        self.mark = len(self.seen)
        os.write(self.fd, text.encode())

    def expect(self, wanted: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while wanted.encode() not in self.seen[self.mark :]:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} not seen in: {self.seen.decode(errors='replace')}"
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # EIO: husk exec has exited
                    assert wanted.encode() in self.seen[self.mark :], self.seen.decode(
                        errors="replace"
                    )
        return self.seen[self.mark :].decode(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096)
        os.kill(self.pid, 9)
        raise AssertionError(f"husk exec did not exit: {self.seen.decode(errors='replace')}")


@pytest.mark.main_containerd_only  # husk's own commands: no containerd in between
def test_husk_exec_runs_uname_in_the_guest_on_a_pty(
    ctd: Containerd, pod: str, husk_config: Path
) -> None:
    guest_kernel = ctd.ctr("task", "exec", "--exec-id", "k1", pod, "uname", "-r").stdout
    assert guest_kernel.strip() and guest_kernel.decode().strip() != platform.release()
    term = Terminal([str(BIN / "husk"), "--config", str(husk_config), "exec", pod], 40, 120)
    term.expect("husk-debug# ")
    term.type("uname -r; stty size\r")
    screen = term.expect("40 120")
    assert guest_kernel.decode().strip() in screen
    term.resize(50, 140)  # the terminal's SIGWINCH reaches husk exec, which passes it on
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the resize and the typing race: ask again
        term.type("stty size\r")
        if "50 140" in term.expect("husk-debug# "):
            break
    assert "50 140" in term.seen.decode(errors="replace")
    term.type("exit 7\r")
    assert term.wait() == 7


@pytest.mark.main_containerd_only  # husk's own commands: no containerd in between
def test_husk_exec_leaves_on_ctrl_close_bracket(pod: str, husk_config: Path) -> None:
    term = Terminal([str(BIN / "husk"), "--config", str(husk_config), "exec", pod], 24, 80)
    term.expect("husk-debug# ")
    term.type("\x1d")
    assert term.wait() == 0
    assert "left the debug console" in term.seen.decode(errors="replace")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.main_containerd_only  # husk's own commands: no containerd in between
def test_husk_metrics_shows_the_containers_memory_near_its_cgroup_reading(
    ctd: Containerd, pod: str, husk_config: Path, state_root: Path
) -> None:
    reading = ctd.ctr("task", "exec", "--exec-id", "m1", pod, "sh", "-c", OWN_MEMORY).stdout
    current = int(reading.decode().strip())
    assert current >= 32 << 20  # the pod's shared memory is charged to its cgroup
    proc = husk(husk_config, "metrics", pod)
    assert proc.returncode == 0, proc.stderr
    found = _samples(proc.stdout)
    labels = (("container_id", pod), ("sandbox_id", pod))
    usage = found[("husk_container_memory_usage_bytes", labels)]
    assert abs(usage - current) <= 0.2 * current
    assert found[("husk_vmm_resident_memory_bytes", (("sandbox_id", pod),))] > 0
    assert found[("husk_sandbox_boot_seconds", (("sandbox_id", pod),))] > 0
    guest_total = found[("husk_guest_memory_bytes", (("kind", "total"), ("sandbox_id", pod)))]
    assert 0 < guest_total <= 512 << 20
    create = (("method", "CreateContainer"), ("sandbox_id", pod))
    assert found[("husk_agent_rpc_duration_seconds_count", create)] >= 1
    socket_mode = (state_root / pod / "metrics.sock").stat().st_mode
    assert socket_mode & 0o777 == 0o600


@pytest.mark.main_containerd_only  # husk's own commands: no containerd in between
def test_husk_metrics_of_every_sandbox_parses(pod: str, husk_config: Path) -> None:
    proc = husk(husk_config, "metrics")
    assert proc.returncode == 0, proc.stderr
    assert ("husk_sandbox_info", (("hypervisor", "qemu"), ("sandbox_id", pod))) in _samples(
        proc.stdout
    )
