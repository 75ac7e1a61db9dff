"""The `husk` command as a user runs it: one-line errors, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def husk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shim", *args], capture_output=True, text=True, check=False
    )


def test_config_show_prints_effective_toml() -> None:
    proc = husk("config", "show")
    assert proc.returncode == 0, proc.stderr
    assert "[hypervisor.qemu]" in proc.stdout
    assert 'accel = "auto"' not in proc.stdout  # resolved for this host


def test_config_show_json_has_sections() -> None:
    data = json.loads(husk("config", "show", "--json").stdout)
    assert data["runtime"]["hypervisor"] == "qemu"
    assert data["hypervisor"]["qemu"]["accel"] in ("kvm", "tcg")


def test_bad_value_is_one_line_on_stderr_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[hypervisor.qemu]\ndefault_memory = "lots"\n')
    proc = husk("--config", str(bad), "config", "show")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "default_memory" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_hypervisor_lists_registered_ones_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[runtime]\nhypervisor = "nope"\n')
    proc = husk("--config", str(bad), "check")
    assert proc.returncode == 2
    assert "registered: builtin, cloud-hypervisor, qemu" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_check_exit_status_follows_the_verdict() -> None:
    proc = husk("check", "--json")
    assert proc.returncode == (0 if json.loads(proc.stdout)["ok"] else 1)


def test_containerd_config_for_containerd_2_prints_version_3() -> None:
    proc = husk("containerd-config", "--containerd-version", "2.1")
    assert proc.returncode == 0, proc.stderr
    assert '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.husk]' in proc.stdout
    assert '[plugins."io.containerd.cri.v1.images".pinned_images]' in proc.stdout


def test_containerd_config_for_an_unsupported_containerd_is_one_line() -> None:
    proc = husk("containerd-config", "--containerd-version", "1.5")
    assert proc.returncode == 2
    assert (
        proc.stderr == "husk: containerd 1.5 is not supported: husk needs containerd 1.6 or newer\n"
    )
