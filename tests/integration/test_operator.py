"""What an operator reaches for, against real containerd + QEMU: log URIs, the debug
console, metrics, versions and the sandbox list.

One pod sandbox VM (booted once for the module, with the debug console on)
hosts most tests: its app containers join it through the CRI annotations, so
each test costs a container, not a VM boot. The Create failures run as
standalone containers, to show they leave no sandbox behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.cli import local_images
from shim.sandbox import cleanup
from shim.sandbox.state import SandboxState
from tests.integration.containerd import Containerd
from tests.integration.test_shim_containerd import _REASON

IMAGE = local_images.BUSYBOX_REFERENCE
RUNTIME = ["--runtime", "io.containerd.husk.v2"]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration]
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))

#: the pod's init fills 32 MiB of its /dev/shm (charged to its cgroup) before it sleeps
FILL = "head -c 33554432 /dev/zero > /dev/shm/fill && touch /tmp/filled && exec sleep 100000"

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
    path.write_text(f'[runtime]\nstate_dir = "{state_root}"\n')
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ctd(husk_config: Path) -> Iterator[Containerd]:
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {"HUSK_CONFIG": str(husk_config)})
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
    ctd.ctr("run", *RUNTIME, "-d", *annotations("sandbox", name), IMAGE, name,
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


def test_husk_version_matches_the_shims(ctd: Containerd) -> None:
    husk = subprocess.run([BIN / "husk", "--version"], capture_output=True, text=True, check=True)
    shim = subprocess.run([BIN / "containerd-shim-husk-v2", "-v"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert husk.stdout == shim.stdout and "guest kernel " in husk.stdout


def test_sandbox_ls_lists_the_running_pod(pod: str, husk_config: Path) -> None:
    out = subprocess.run([BIN / "husk", "--config", str(husk_config), "sandbox", "ls"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[pod][1] == "qemu" and rows[pod][-1] == "running"
    assert int(rows[pod][-2]) >= 1
    state = SandboxState.load(Path(husk_config.read_text().split('"')[1]) / pod)
    assert state.vcpus >= 1 and state.memory_mib >= 64
