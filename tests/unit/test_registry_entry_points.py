"""A third-party plugin added with `pip install` registers through `husk.hypervisors`.

The test builds a tiny plugin distribution, installs it into a fresh venv that
sees husk through the parent's site dirs, and asks husk in that venv about it.
It needs no network: the build uses the already-installed setuptools.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_MODULE = """
from collections.abc import Mapping, Sequence
from typing import Any

from shim.errors import NotSupportedError
from shim.hypervisor import Hypervisor, HypervisorPlugin
from shim.config.schema import Key


class TinyPlugin(HypervisorPlugin):
    name = "tiny"

    @property
    def keys(self) -> Sequence[Key]:
        return (Key("path", str, "/bin/true"), Key("speed", int, 1, minimum=1))

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        raise NotSupportedError(self.name, "starting a sandbox")


PLUGIN = TinyPlugin()
"""

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-husk-plugin"
version = "0.1"

[project.entry-points."husk.hypervisors"]
tiny = "tiny_husk_plugin:PLUGIN"
"""


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("entry-point")
    dist = root / "dist"
    dist.mkdir()
    (dist / "pyproject.toml").write_text(PYPROJECT)
    (dist / "tiny_husk_plugin.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Build with husk's own pip (the venv's bundled pip may lack a wheel builder),
    # then install the wheel into the venv as `pip install` would.
    wheels = root / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(dist),
        ],
        check=True,
    )
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            *map(str, wheels.glob("*.whl")),
        ],
        check=True,
    )
    return python


def husk_in(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "shim", *args], capture_output=True, text=True, check=False
    )


def test_installed_plugin_is_registered(venv_python: Path) -> None:
    proc = subprocess.run(
        [str(venv_python), "-c", "from shim import registry; print(registry.names())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "'tiny'" in proc.stdout


def test_installed_plugin_is_not_seen_outside_its_venv() -> None:
    from shim import registry

    assert "tiny" not in registry.names()


def test_installed_plugin_section_gets_defaults_and_values(
    venv_python: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[runtime]\nhypervisor = "tiny"\n[hypervisor.tiny]\nspeed = 3\n')
    proc = husk_in(venv_python, "--config", str(cfg), "config", "show")
    assert proc.returncode == 0, proc.stderr
    assert '[hypervisor.tiny]\npath = "/bin/true"\nspeed = 3\n' in proc.stdout


def test_installed_plugin_section_rejects_bad_values_by_key(
    venv_python: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[hypervisor.tiny]\nspeed = 0\n")
    proc = husk_in(venv_python, "--config", str(cfg), "config", "show")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"husk: {cfg}: [hypervisor.tiny] speed = 0: expected an integer of at least 1"
    )
