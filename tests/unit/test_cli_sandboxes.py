"""`husk sandbox ls`: what the state records say about each sandbox, live or orphaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shim.cli import sandboxes
from shim.sandbox.state import RUNNING, SandboxState

ROOT = Path(__file__).resolve().parents[2]


def record(root: Path, sandbox_id: str, *, alive: bool, containers: list[str]) -> SandboxState:
    state = SandboxState.create(root, sandbox_id, "default")
    if alive:
        state.claim(os.getpid())
    else:
        state.shim_pid = 2**22 + 1  # above pid_max's default: never a live process
        state.save()
    state.describe_vm("qemu", 2, 768)
    for cid in containers:
        state.add_container(cid)
    state.set_status(RUNNING)
    return state


def test_ls_shows_hypervisor_size_containers_and_state(tmp_path: Path) -> None:
    record(tmp_path, "live", alive=True, containers=["live", "app"])
    record(tmp_path, "dead", alive=False, containers=["dead"])
    found = {r.id: r for r in sandboxes.rows(tmp_path, now=time.time() + 120)}
    assert found["live"].state == "running" and found["dead"].state == "orphaned"
    assert (found["live"].hypervisor, found["live"].vcpus, found["live"].memory_mib) == (
        "qemu", 2, 768,
    )  # fmt: skip
    assert found["live"].containers == ["live", "app"]
    assert sandboxes.age(found["live"].age_seconds) == "2m"


def test_husk_sandbox_ls_prints_a_table_and_json(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    record(state_dir, "sb-1", alive=True, containers=["sb-1"])
    config = tmp_path / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state_dir}"\n')

    def husk(*args: str) -> str:
        argv = [sys.executable, "-m", "shim", "--config", str(config), "sandbox", "ls", *args]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout

    lines = husk().splitlines()
    assert lines[0].split() == list(sandboxes.HEADER)
    fields = lines[1].split()
    assert fields[:2] + fields[3:] == ["sb-1", "qemu", "2", "768M", "1", "running"]
    assert fields[2].endswith("s")  # seconds old
    assert json.loads(husk("--json"))[0]["containers"] == ["sb-1"]
