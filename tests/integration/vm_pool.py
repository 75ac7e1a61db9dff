"""A VM pool's daemon as an operator drives it (``husk factory``), for the tests and benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: this venv's ``husk``
HUSK = str(Path(sys.executable).parent / "husk")


def husk(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``husk --config <config> <args>``, its output as text."""
    return subprocess.run(
        [HUSK, "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=180,
    )


def pool_status(config: Path) -> dict[str, Any] | None:
    """``husk factory status --json``'s pool part (None: no daemon answers)."""
    found = json.loads(husk(config, "factory", "status", "--json", check=False).stdout)
    pool: dict[str, Any] | None = found["pool"]
    return pool


def wait_full(config: Path, timeout: float = 120.0) -> dict[str, Any]:
    """The pool's status once every VM it keeps is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = pool_status(config)
        if pool is not None and pool["ready"] == pool["size"]:
            return pool
        time.sleep(0.2)
    raise AssertionError(f"the pool is not full after {timeout:g} s: {pool_status(config)}")


@contextmanager
def running_pool(config: Path) -> Iterator[Path]:
    """``husk factory init`` for the block, ``husk factory destroy`` after it."""
    husk(config, "factory", "init")
    try:
        yield config
    finally:
        husk(config, "factory", "destroy", check=False)
