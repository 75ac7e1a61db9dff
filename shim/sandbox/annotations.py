"""CRI annotations that decide which sandbox VM a container runs in.

containerd's CRI plugin marks the pause container of a pod with
``io.kubernetes.cri.container-type = sandbox`` and every other container of the
pod with ``container`` plus ``io.kubernetes.cri.sandbox-id = <pod sandbox id>``.
Without them (plain ``ctr``) a container is its own sandbox.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
TYPE_SANDBOX = "sandbox"
TYPE_CONTAINER = "container"


@dataclass(frozen=True)
class Placement:
    """Which sandbox a container belongs to and whether it starts that sandbox."""

    sandbox_id: str
    #: True for the container that owns (boots) the sandbox
    owner: bool


def placement(container_id: str, spec: Mapping[str, Any], sandbox_model: str = "pod") -> Placement:
    """Where ``container_id`` runs, from its OCI spec's annotations."""
    annotations = spec.get("annotations") or {}
    if sandbox_model == "pod" and annotations.get(CONTAINER_TYPE) == TYPE_CONTAINER:
        sandbox_id = str(annotations.get(SANDBOX_ID) or "")
        if sandbox_id and sandbox_id != container_id:
            return Placement(sandbox_id, owner=False)
    return Placement(container_id, owner=True)
