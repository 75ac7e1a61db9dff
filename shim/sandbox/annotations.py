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

from shim import identifiers
from shim.errors import InvalidArgumentError

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
    """Where ``container_id`` runs, from its OCI spec's annotations.

    A pod sandbox id that breaks containerd's identifier rules (``../x``)
    raises InvalidArgumentError naming the annotation.
    """
    annotations = spec.get("annotations") or {}
    if sandbox_model == "pod" and annotations.get(CONTAINER_TYPE) == TYPE_CONTAINER:
        sandbox_id = str(annotations.get(SANDBOX_ID) or "")
        if sandbox_id and sandbox_id != container_id:
            # the id names the pod's state dir and shim socket: checked before any path
            try:
                identifiers.validate("pod sandbox", sandbox_id)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"annotation {SANDBOX_ID}: {e}") from None
            return Placement(sandbox_id, owner=False)
    return Placement(container_id, owner=True)


#: husk's own pod annotations; a CRI handler passes them on with
#: ``pod_annotations = ["io.husk.*"]``
HUSK_PREFIX = "io.husk."
#: ``io.husk.config.hypervisor.<key>``: a ``[hypervisor.*]`` key for this pod's VM
HYPERVISOR_PREFIX = "io.husk.config.hypervisor."


def hypervisor_overrides(
    annotations: Mapping[str, Any],
    section: Mapping[str, Any],
    section_name: str,
    what: str,
) -> dict[str, int]:
    """The ``[hypervisor.*]`` keys a pod sets for its VM through annotations.

    Only keys the section's ``enable_annotations`` lists are taken (Kata's
    rule); any other ``io.husk.*`` annotation, a value that is not a whole
    number, or one outside the key's range fails in one line naming it.
    """
    enabled = set(section.get("enable_annotations") or ())
    limits = {
        "default_vcpus": (1, int(section.get("default_maxvcpus") or 0), "default_maxvcpus"),
        "default_memory": (64, int(section.get("default_maxmemory") or 0), "default_maxmemory"),
    }
    found: dict[str, int] = {}
    for name, raw in annotations.items():
        if not name.startswith(HUSK_PREFIX):
            continue
        key = name.removeprefix(HYPERVISOR_PREFIX) if name.startswith(HYPERVISOR_PREFIX) else ""
        if key not in limits:
            known = ", ".join(HYPERVISOR_PREFIX + k for k in limits)
            raise InvalidArgumentError(f"{what}: unknown annotation {name} (husk knows {known})")
        if key not in enabled:
            raise InvalidArgumentError(
                f'{what}: annotation {name} is not enabled: add "{key}" to '
                f"enable_annotations in {section_name}"
            )
        try:
            value = int(str(raw))
        except ValueError:
            raise InvalidArgumentError(
                f"{what}: annotation {name}={raw!r} is not a whole number"
            ) from None
        low, high, high_key = limits[key]
        if value < low or (high and value > high):
            raise InvalidArgumentError(
                f"{what}: annotation {name}={value} is outside {low}..{high} "
                f"({high_key} in {section_name})"
            )
        found[key] = value
    return found
