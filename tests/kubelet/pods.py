"""CRI configs shaped like the kubelet's (a pod sandbox, a container in it) and its steps.

The kubelet fills far more; these keep what a runtime acts on (metadata,
hostname, log directory, namespace modes, annotations, command, resources)
so a test states only what it is about.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.cli import local_images
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.client import CriClient
from tests.kubelet.cri_containerd import CNI_BIN_DIR


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


# ---- what the kubelet does with them ----


@dataclass(frozen=True)
class Pod:
    """A running pod sandbox and the config it was made from."""

    id: str
    config: cri.PodSandboxConfig


def start_container(client: CriClient, pod: Pod, config: cri.ContainerConfig) -> str:
    """Create and start a container in ``pod``; its id."""
    container_id = client.create_container(pod.id, config, pod.config)
    client.start_container(container_id)
    return container_id


def remove_container(client: CriClient, container_id: str) -> None:
    """Stop (no grace) and remove a container."""
    client.stop_container(container_id, timeout=0)
    client.remove_container(container_id)


def remove_pod(client: CriClient, pod: Pod) -> None:
    """Stop and remove a pod sandbox."""
    client.stop_pod_sandbox(pod.id)
    client.remove_pod_sandbox(pod.id)


def skip_reason() -> str | None:
    """Why this host cannot run CRI pods (None if it can)."""
    if os.geteuid() != 0:
        return "needs root (containerd, CNI, mounts)"
    if not shutil.which("containerd") or not shutil.which("ctr"):
        return "containerd is not installed"
    if not Path(CNI_BIN_DIR, "bridge").exists():
        return f"no CNI plugins in {CNI_BIN_DIR}: install containernetworking-plugins"
    return None


def http_get(ip: str, port: int, path: str, timeout: float = 60.0) -> bytes:
    """A raw HTTP/1.0 GET (no proxy settings apply); retries until the server listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=5) as conn:
                conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
                return b"".join(iter(lambda: conn.recv(4096), b""))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
