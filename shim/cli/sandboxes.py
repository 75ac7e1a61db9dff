"""``husk sandbox ls``: every sandbox under ``[runtime] state_dir``, from its record.

The same records ``husk cleanup`` reads: a sandbox whose shim is gone shows as
``orphaned`` (``husk cleanup`` reclaims it); a live one shows the status its
shim keeps (``booting``, ``running``, ``stopping``; ``pooled`` for a VM of the
VM pool that no sandbox has claimed yet).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shim.sandbox.state import SandboxState, sandboxes

ORPHANED = "orphaned"
HEADER = ("SANDBOX", "HYPERVISOR", "AGE", "VCPUS", "MEMORY", "CONTAINERS", "STATE")


@dataclass(frozen=True)
class SandboxRow:
    """One sandbox as ``husk sandbox ls`` shows it."""

    id: str
    hypervisor: str
    age_seconds: float
    vcpus: int
    memory_mib: int
    containers: list[str]
    state: str


def row(state: SandboxState, now: float) -> SandboxRow:
    """The row of one sandbox record."""
    return SandboxRow(
        id=state.id,
        hypervisor=state.hypervisor or "-",
        age_seconds=max(now - state.created, 0.0) if state.created else 0.0,
        vcpus=state.vcpus,
        memory_mib=state.memory_mib,
        containers=list(state.containers),
        state=state.status if state.shim_alive() else ORPHANED,
    )


def rows(root: Path, now: float | None = None) -> list[SandboxRow]:
    """Every sandbox under ``root``, oldest first."""
    when = time.time() if now is None else now
    found = [row(state, when) for state in sandboxes(root)]
    return sorted(found, key=lambda r: (-r.age_seconds, r.id))


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: the largest whole unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def render_text(found: list[SandboxRow]) -> str:
    """An aligned table with a header line."""
    lines = [HEADER]
    for r in found:
        lines.append(
            (
                r.id,
                r.hypervisor,
                age(r.age_seconds) if r.age_seconds else "-",
                str(r.vcpus or "-"),
                f"{r.memory_mib}M" if r.memory_mib else "-",
                str(len(r.containers)),
                r.state,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def render_json(found: list[SandboxRow]) -> str:
    """The rows as a JSON list."""
    return json.dumps([asdict(r) for r in found], indent=2)
