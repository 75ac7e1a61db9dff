"""A pod as containerd 2's CRI describes it to a shim sandboxer, read into :class:`PodSettings`.

With ``sandboxer = "shim"`` there is no pause container whose spec carries the
pod's settings: ``CreateSandbox`` hands the shim the CRI's
``runtime.v1.PodSandboxConfig`` in ``options`` instead (packed by containerd's
typeurl, whose type URL is the bare message name). From it husk takes the
hostname, the sysctls, the pod's declared resources (``linux.resources``, the
figures containerd's pause path writes as ``io.kubernetes.cri.sandbox-*``
annotations) and husk's own ``io.husk.*`` pod annotations; and, since the
CRI leaves the pod's ``/etc/hostname``, ``/etc/hosts`` and
``/etc/resolv.conf`` to the sandboxer, their text, made as containerd's
pause path makes them (``setupSandboxFiles``): the pod's hostname (the
host's if it has none), the host's ``/etc/hosts``, and a ``resolv.conf``
from the pod's ``dns_config`` (the host's when it has none). Here every pod
annotation reaches the shim (no ``pod_annotations`` filter applies), so which
``io.husk.*`` keys a pod may set is decided by the configuration's
``enable_annotations`` alone, as on the pause path.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from agent_proto import cri_pod_pb2
from shim.errors import InvalidArgumentError
from shim.sandbox import sizing
from shim.sandbox.annotations import HUSK_PREFIX
from shim.sandbox.pod_settings import PodSettings

log = logging.getLogger("husk.sandbox_api")

POD_SANDBOX_CONFIG = "runtime.v1.PodSandboxConfig"
HOST_HOSTS = Path("/etc/hosts")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def pod_settings(
    sandbox_id: str, options: any_pb2.Any, annotations: Mapping[str, str]
) -> PodSettings:
    """The settings of sandbox ``sandbox_id`` from CreateSandbox's ``options`` and ``annotations``.

    Options of another type are not the CRI's: the sandbox then has only the
    request's annotations. A PodSandboxConfig that does not decode fails in one line.
    """
    kept = dict(annotations)
    if not options.type_url:
        return PodSettings(annotations=kept)
    if options.type_url.rsplit("/", 1)[-1] != POD_SANDBOX_CONFIG:
        log.info("sandbox %s: options of type %s are not read", sandbox_id, options.type_url)
        return PodSettings(annotations=kept)
    config = cri_pod_pb2.PodSandboxConfig()
    try:
        config.ParseFromString(options.value)
    except DecodeError as e:
        raise InvalidArgumentError(
            f"sandbox {sandbox_id}: options ({options.type_url}) do not decode: {e}"
        ) from None
    for key, value in config.annotations.items():
        if key.startswith(HUSK_PREFIX):
            kept.setdefault(key, value)
    if config.linux.HasField("resources"):
        resources = config.linux.resources
        kept.setdefault(sizing.SANDBOX_CPU_PERIOD, str(resources.cpu_period))
        kept.setdefault(sizing.SANDBOX_CPU_QUOTA, str(resources.cpu_quota))
        kept.setdefault(sizing.SANDBOX_MEMORY, str(resources.memory_limit_in_bytes))
    return PodSettings(
        hostname=config.hostname,
        sysctls=dict(config.linux.sysctls),
        annotations=kept,
        files=pod_files(config),
    )


def pod_files(config: cri_pod_pb2.PodSandboxConfig) -> dict[str, str]:
    """The pod's ``/etc/hostname``, ``/etc/hosts`` and ``/etc/resolv.conf``, by path."""
    files = {"/etc/hostname": (config.hostname or socket.gethostname()) + "\n"}
    if config.HasField("dns_config"):
        files["/etc/resolv.conf"] = resolv_conf(config.dns_config)
    for path, source in (("/etc/hosts", HOST_HOSTS), ("/etc/resolv.conf", HOST_RESOLV_CONF)):
        if path not in files:
            try:
                files[path] = source.read_text()
            except OSError as e:
                log.warning("pod file %s: cannot read the host's %s: %s", path, source, e)
    return files


def resolv_conf(dns: cri_pod_pb2.DNSConfig) -> str:
    """``resolv.conf`` for a pod's DNS settings, as the CRI writes it."""
    lines = []
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    lines += [f"nameserver {server}" for server in dns.servers]
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "".join(line + "\n" for line in lines)
