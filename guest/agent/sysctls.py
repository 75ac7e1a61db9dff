"""Sysctls in a container's spec: which stay with the container, which are the pod network's.

The agent drops every container's network namespace, because the VM's network
is the pod's (the shim plugs the pod's interfaces into the VM). A ``net.*``
sysctl therefore cannot go to the runtime (crun and runc refuse one without a
new network namespace); it belongs to the VM's own network. Kubernetes puts a
pod's sysctls on its sandbox (pause) container and containerd 2 adds
``net.ipv4.ping_group_range`` to every pod, so the sandbox's first container
sets the pod network's sysctls on the VM, once. A later container's ``net.*``
sysctl that the pod's network already has is dropped; one that differs fails,
since the network it would change is the whole pod's.

Other sysctls (``kernel.*`` of the IPC and UTS namespaces, ...) stay in the
spec: the runtime checks them against the container's namespaces and names one
it refuses.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from common.errors import InvalidArgumentError

log = logging.getLogger("husk.agent.sysctls")

PROC_SYS = Path("/proc/sys")


def is_network(key: str) -> bool:
    """Whether ``key`` (dotted or slashed form) is a sysctl of the network namespace."""
    return key.startswith(("net.", "net/"))


def proc_path(key: str) -> Path:
    """Where ``key`` lives below ``/proc/sys``, relative.

    ``net.ipv4.ip_forward`` and ``net/ipv4/ip_forward`` name the same file; in
    the dotted form a ``/`` stands for a dot inside a name (``eth0/100`` is the
    interface ``eth0.100``), as sysctl(8) writes it.
    """
    if key.split(".", 1)[0].count("/"):
        parts = key.split("/")
    else:
        parts = [part.replace("/", ".") for part in key.split(".")]
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgumentError(f"sysctl {key!r} is not a sysctl name")
    return Path(*parts)


def _same(a: str, b: str) -> bool:
    # the kernel prints multi-value sysctls with tabs where specs use spaces
    return a.split() == b.split()


class PodNetworkSysctls:
    """The pod network's sysctls, set on the VM by the pod's first container.

    ``host_mode`` (an agent on a development host) only records them: the
    host's network is not the pod's.
    """

    def __init__(self, proc_sys: Path = PROC_SYS, *, host_mode: bool = False) -> None:
        self.proc_sys = proc_sys
        self.host_mode = host_mode
        #: what the pod's first container set; None until one was created
        self.applied: dict[str, str] | None = None
        self._logged: set[str] = set()

    def take(self, container_id: str, sysctls: Mapping[str, str]) -> None:
        """Set (first container) or check (later ones) the ``net.*`` sysctls of a spec."""
        wanted = {key: value for key, value in sysctls.items() if is_network(key)}
        if self.applied is None:
            self._apply(wanted)
            self.applied = wanted
            if wanted:
                self._logged.update(wanted)
                log.info(
                    "the pod's network sysctls from container %s set on the VM: %s",
                    container_id,
                    ", ".join(f"{k}={v}" for k, v in sorted(wanted.items())),
                )
            return
        for key, value in wanted.items():
            had = self.applied.get(key)
            if had is None or not _same(had, value):
                raise InvalidArgumentError(
                    f"container '{container_id}' sets sysctl {key}={value!r}, but its "
                    f"network is the pod's, which has {key}={had!r}: set it on the pod"
                )
            if key not in self._logged:
                self._logged.add(key)
                log.info("sysctl %s of container %s: the pod's network has it", key, container_id)

    def _apply(self, wanted: Mapping[str, str]) -> None:
        paths = {key: self.proc_sys / proc_path(key) for key in wanted}
        for key, path in paths.items():
            if not path.is_file():
                raise InvalidArgumentError(
                    f"sysctl {key} cannot be set on the VM's network: its kernel has no such sysctl"
                )
        if self.host_mode:
            log.info("host mode: not setting the pod's network sysctls %s", sorted(wanted))
            return
        for key, path in paths.items():
            _write(key, path, wanted[key])


def _write(key: str, path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgumentError(
            f"sysctl {key} cannot be set on the VM's network: {exc.strerror}"
        ) from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        reason = "the kernel refuses that value" if exc.errno == errno.EINVAL else exc.strerror
        raise InvalidArgumentError(
            f"sysctl {key}={value!r} cannot be set on the VM's network: {reason}"
        ) from None
    finally:
        os.close(fd)
