"""The driver's own record of the host resources it creates.

``<state_dir>/qemu/resources.json`` is a JSON list of ``shim.sandbox.state.Resource``
dicts (``{"kind": "socket", "path": ...}``, ``{"kind": "process", "pid": ...,
"start": ..., "name": "qemu"}``), appended to *before* each resource is created
and replaced atomically (write + rename). It is separate from the shim's
``sandbox.json`` because the shim rewrites that file from memory; ``husk
cleanup`` can read both (and finds QEMU anyway: its command line names the
state dir).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from shim.sandbox.state import Resource


class ResourceRecord:
    """An append-only list of resources in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Resource]:
        """The recorded resources (none if the file is missing or garbled)."""
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [Resource(**item) for item in raw if isinstance(item, dict)]

    def add(self, *resources: Resource) -> None:
        """Append ``resources`` not yet recorded (call before creating them)."""
        current = self.load()
        new = [r for r in resources if r not in current]
        if not new:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps([asdict(r) for r in current + new], indent=1))
        os.replace(tmp, self.path)
