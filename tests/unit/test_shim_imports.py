"""The serving shim loads only what a sandbox needs: memory per sandbox counts."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(statement: str, module: str) -> bool:
    code = f"import sys; {statement}; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_serving_shim_does_not_load_pyroute2_until_a_netns_needs_it() -> None:
    assert not loaded_after("import shim.containerd.serve", "pyroute2")


def test_network_setup_loads_pyroute2_when_used() -> None:
    assert loaded_after("from shim import network; network.setup", "pyroute2")
