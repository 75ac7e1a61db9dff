"""CRI configs shaped like the kubelet's: a pod sandbox and a container in it.

The kubelet fills far more; these keep what a runtime acts on (metadata,
hostname, log directory, namespace modes, annotations, command, resources)
so a test states only what it is about.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from shim.cli import local_images
from tests.kubelet import cri_api_pb2 as cri


def pod_config(
    name: str,
    log_directory: Path | None = None,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    k8s_namespace: str = "default",
) -> cri.PodSandboxConfig:
    """A pod with its own network and IPC namespaces and a PID namespace per container.

    ``log_directory`` is where CRI writes container logs (none if unset).
    """
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(
            name=name, uid=uuid.uuid4().hex, namespace=k8s_namespace, attempt=0
        ),
        hostname=name,
        log_directory=str(log_directory) if log_directory else "",
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(
                    network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD
                )
            )
        ),
    )


def container_config(
    name: str,
    command: Sequence[str],
    image: str = local_images.BUSYBOX_REFERENCE,
    memory_limit: int = 0,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> cri.ContainerConfig:
    """A container running ``command`` (the image's entrypoint replaced), logging to ``<name>.log``.

    ``memory_limit`` in bytes, 0 for none.
    """
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0),
        image=cri.ImageSpec(image=image),
        command=list(command),
        log_path=f"{name}.log",
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory_limit)
        ),
    )
