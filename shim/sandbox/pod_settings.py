"""What a sandbox started for a pod as a whole (not by its first container) knows of the pod.

A runtime that starts the sandbox itself, with no pause container (containerd
2's sandbox API), learns the pod's settings from the pod's own configuration
instead of from a sandbox container's spec; the protocol layer translates them
into these, so the sandbox engine sees the same things on either path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PodSettings:
    """The pod's hostname, sysctls and the annotations that size and configure its VM."""

    #: the guest's hostname (empty: the sandbox id)
    hostname: str = ""
    #: the pod's sysctls; its ``net.*`` ones are the VM's network's
    sysctls: Mapping[str, str] = field(default_factory=dict)
    #: the pod's total (``io.kubernetes.cri.sandbox-*``) and husk's ``io.husk.*`` keys,
    #: read as from a pause container's annotations
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: files every container of the pod sees (``/etc/resolv.conf``, ...): their
    #: path in the container and their text, mounted read-only unless the
    #: container mounts something there itself
    files: Mapping[str, str] = field(default_factory=dict)
