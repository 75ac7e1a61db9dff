"""The VM pool end to end: a real daemon, real QEMU members, a real containerd and ``ctr``.

One containerd serves the module with ``[factory] vm_cache_number = 1``
(members are clones of the session's template, so refills take seconds); the
pool daemon is started as an operator would, with ``husk factory init``.
Whether a sandbox got a pool VM is read from its shim's log line ("from the
VM pool"); the pool's own figures from ``husk factory status --json``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.cli import local_images
from shim.pool import protocol
from shim.pool.member import PREFIX
from tests.integration.containerd import Containerd, sandbox_dirs
from tests.integration.test_shim_containerd import RUNTIME, pytestmark  # noqa: F401
from tests.integration.vm_pool import HUSK, husk, running_pool, wait_full

IMAGE = local_images.BUSYBOX_REFERENCE
FROM_POOL = "from the VM pool"


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hpool-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def husk_toml(base: Path, shared_template: str) -> Path:
    path = base / "husk.toml"
    path.write_text(
        f'[runtime]\nstate_dir = "{base}/state"\n{shared_template}'
        f'vm_cache_number = 1\nvm_cache_endpoint = "{base}/pool.sock"\n'
        "[agent.husk]\ndebug_console = true\n"
    )
    return path


def stop_pool(husk_toml: Path) -> None:
    """Stop the daemon alone (``husk factory destroy`` would take the session's template too)."""
    endpoint = husk_toml.parent / "pool.sock"
    protocol.request(endpoint, {"op": "stop"}, 10.0)
    wait_until(lambda: not endpoint.exists() and pool_dirs(husk_toml) == [])


@pytest.fixture(scope="module")
def pool(husk_toml: Path) -> Iterator[Path]:
    """The running daemon (started once; tests that stop it start it again)."""
    with running_pool(husk_toml):
        wait_full(husk_toml)
        yield husk_toml


@pytest.fixture(scope="module")
def ctd(husk_toml: Path) -> Iterator[Containerd]:
    root = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(root, {"HUSK_CONFIG": str(husk_toml)})
    daemon.ctr("image", "import", str(local_images.build_busybox(root / "busybox.tar")))
    yield daemon
    daemon.stop()


def cid() -> str:
    return "pl-" + uuid.uuid4().hex[:10]


def boot_line(ctd: Containerd, name: str) -> str:
    for line in ctd.log_text().splitlines():
        if f"sandbox {name}: " in line and ("agent ready" in line or "ready after" in line):
            return line
    raise AssertionError(f"no boot line for sandbox {name}")


def sleeper_from_pool(ctd: Containerd, husk_toml: Path) -> str:
    """A sleeping container started in a VM of the (full) pool; its name."""
    wait_full(husk_toml)
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "600")
    try:
        assert FROM_POOL in boot_line(ctd, name)
    except BaseException:
        remove(ctd, name)
        raise
    return name


def remove(ctd: Containerd, *names: str) -> None:
    for name in names:
        ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        ctd.ctr("task", "delete", "-f", name, check=False)
        ctd.ctr("container", "rm", name, check=False)


def guest_screen(husk_toml: Path, sandbox: str, script: str, attempts: int = 3) -> str:
    """What ``husk exec`` showed for ``script`` typed into the guest's debug console.

    Typed-ahead input can be lost while the guest (re)opens its console port
    (as tests/integration/guest_shell.py says): the script is typed again
    until the screen shows its last line's answer, ``END-OF-PROBE``.
    """
    argv = [HUSK, "--config", str(husk_toml), "exec", sandbox]
    # no line editing: ash would ask a "linux" terminal where its cursor is
    env = {**os.environ, "TERM": "dumb"}
    screen = ""
    for _ in range(attempts):
        try:
            done = subprocess.run(
                argv,
                input=script + "echo END-OF-PROBE\nexit 0\n",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env=env,
            )
            screen = done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            screen = out.decode(errors="replace") if isinstance(out, bytes) else out
        if "END-OF-PROBE" in screen.replace("\r", "").splitlines():
            break
    return screen


def pool_dirs(husk_toml: Path) -> list[str]:
    return [d.name for d in sandbox_dirs(husk_toml.parent / "state") if d.name.startswith(PREFIX)]


def qemus_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "qemu-system" in cmdline and text in cmdline:
                found.append(int(entry.name))
    return found


def wait_until(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    assert check()


def test_a_container_starts_in_a_pool_vm_and_the_pool_boots_the_next(
    pool: Path, ctd: Containerd
) -> None:
    before = wait_full(pool)
    name = cid()
    out = ctd.ctr("run", *RUNTIME, "--rm", IMAGE, name, "sh", "-c", "hostname; echo ok")
    assert out.stdout.decode().split() == [name, "ok"]
    assert FROM_POOL in boot_line(ctd, name)
    after = wait_full(pool)
    assert after["hits"] == before["hits"] + 1
    assert after["refill_seconds_last"] > 0
    assert after["idle_memory_bytes"] > 50 << 20
    assert name not in [d.name for d in sandbox_dirs(pool.parent / "state")]


def test_the_exercise_leaves_nothing_in_the_guest_a_sandbox_gets(
    pool: Path, ctd: Containerd
) -> None:
    name = sleeper_from_pool(ctd, pool)
    try:
        # what the exercise made: its mounts, its bundle and runc state, its cgroup
        script = (
            "echo H$(hostname)\n"
            "echo M$(grep -c exercise /proc/mounts)\n"
            "echo B$(ls /run/husk-agent/bundles /run/husk-agent/runc | grep -c exercise)\n"
            "test -e /sys/fs/cgroup/husk/husk-pool-exercise || echo NO-CGROUP\n"
        )
        screen = guest_screen(pool, name, script)
        lines = screen.replace("\r", "").splitlines()
        assert {f"H{name}", "M0", "B0", "NO-CGROUP"} <= set(lines), screen
    finally:
        remove(ctd, name)


def test_two_pool_vms_differ_in_randomness_boot_id_and_mac(pool: Path, ctd: Containerd) -> None:
    names: list[str] = []
    probes = []
    try:
        for _ in range(2):
            names.append(sleeper_from_pool(ctd, pool))
        script = (
            "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 "
            "| tr -d ' \\n'; echo; hostname"
        )
        for name in names:
            out = ctd.ctr("task", "exec", "--exec-id", "p", name, "sh", "-c", script)
            probes.append(out.stdout.decode().split())
        (boot_a, rng_a, host_a), (boot_b, rng_b, host_b) = probes
        assert boot_a != boot_b and rng_a != rng_b
        assert (host_a, host_b) == tuple(names)
    finally:
        remove(ctd, *names)


def test_a_start_that_finds_no_pool_boots_without_it_in_one_line(
    husk_toml: Path, ctd: Containerd
) -> None:
    stop_pool(husk_toml)
    try:
        name = cid()
        out = ctd.ctr("run", *RUNTIME, "--rm", IMAGE, name, "echo", "fine")
        assert out.stdout.decode() == "fine\n"
        lines = [
            line for line in ctd.log_text().splitlines() if "no VM pool at" in line and name in line
        ]
        assert len(lines) == 1 and "from the VM template" in lines[0]
        assert FROM_POOL not in boot_line(ctd, name)
    finally:
        husk(husk_toml, "factory", "init")


def test_stopping_the_pool_leaves_claimed_sandboxes_and_takes_the_rest_down(
    husk_toml: Path, ctd: Containerd
) -> None:
    name = sleeper_from_pool(ctd, husk_toml)
    try:
        wait_full(husk_toml)
        assert len(pool_dirs(husk_toml)) == 1
        husk(husk_toml, "factory", "destroy")
        assert pool_dirs(husk_toml) == []
        assert qemus_naming(PREFIX) == [] or all(
            str(husk_toml.parent) not in " ".join(Path(f"/proc/{p}/cmdline").read_text())
            for p in qemus_naming(PREFIX)
        )
        out = ctd.ctr("task", "exec", "--exec-id", "e", name, "echo", "still-here")
        assert out.stdout.decode() == "still-here\n"
    finally:
        remove(ctd, name)
        husk(husk_toml, "factory", "init")
    assert name not in [d.name for d in sandbox_dirs(husk_toml.parent / "state")]


def test_a_killed_daemon_leaves_its_sandboxes_and_its_unclaimed_vms_take_themselves_down(
    husk_toml: Path, ctd: Containerd
) -> None:
    name = sleeper_from_pool(ctd, husk_toml)
    try:
        member = wait_full(husk_toml)["members"][0]
        daemon = [
            p
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and _cmdline(p).startswith(f"{sys.executable} -m shim.pool.daemon")
            and str(husk_toml) in _cmdline(p)
        ]
        assert len(daemon) == 1
        os.kill(int(daemon[0].name), signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{member['vmm_pid']}").exists())
        wait_until(lambda: pool_dirs(husk_toml) == [])
        out = ctd.ctr("task", "exec", "--exec-id", "e", name, "echo", "still-here")
        assert out.stdout.decode() == "still-here\n"
    finally:
        remove(ctd, name)
        husk(husk_toml, "factory", "init")


def test_husk_cleanup_reclaims_a_pool_vm_whose_member_was_killed(husk_toml: Path) -> None:
    status = wait_full(husk_toml)
    member = status["members"][0]
    os.kill(member["pid"], signal.SIGKILL)
    assert Path(f"/proc/{member['vmm_pid']}").exists()  # orphaned: no one tears it down
    state = husk_toml.parent / "state"
    wait_until(lambda: wait_full(husk_toml)["members"][0]["id"] != member["id"], 120)
    husk(husk_toml, "cleanup")
    assert member["id"] not in pool_dirs(husk_toml)
    assert not (state / member["id"]).exists()
    wait_until(lambda: not Path(f"/proc/{member['vmm_pid']}").exists(), 10)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
