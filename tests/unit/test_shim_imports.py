"""The serving shim loads only what a sandbox needs: memory per sandbox counts."""

from __future__ import annotations

import subprocess
import sys

SERVING_SHIM = (
    "import shim.containerd.main, shim.containerd.serve, shim.sandbox.factory; "
    "from shim import registry; registry.lookup('qemu').create({}); "
    "import plugins.qemu.driver, shim.metrics.server, shim.metrics.snapshot"
)


def loaded_after(statement: str, module: str) -> bool:
    code = f"import sys; {statement}; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_serving_shim_does_not_load_pyroute2_until_a_netns_needs_it() -> None:
    assert not loaded_after(SERVING_SHIM, "pyroute2")


def test_network_setup_loads_pyroute2_when_used() -> None:
    assert loaded_after("from shim import network; network.setup", "pyroute2")


def test_starting_the_shim_loads_no_guest_module() -> None:
    loaded = modules_after(SERVING_SHIM)
    assert "plugins.qemu.driver" in loaded
    assert not {m for m in loaded if m == "guest" or m.startswith("guest.")}
