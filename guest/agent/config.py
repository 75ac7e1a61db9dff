"""Where the agent keeps things and what it may change: one frozen :class:`AgentConfig`.

Defaults are the guest's. Kata's paths are kept where the shim depends on them:
the 9p share is mounted at ``/run/kata-containers/shared/containers`` and a
container's rootfs, unless the spec's ``Root.Path`` is absolute, is
``<shared_dir>/<container_id>/<Root.Path or "rootfs">``.

``host_mode`` is for running the agent on a development host or in tests: the
container logic is the same, but the agent never changes the machine itself
(hostname, network, CPUs, clock) and never powers it off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InvalidArgumentError
from guest.agent.auth import FW_CFG_SECRET
from guest.agent.storage import SysfsLayout

KATA_SHARED_DIR = Path("/run/kata-containers/shared/containers")
#: matched with ``fullmatch``: ``$`` would also accept a trailing newline
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class AgentConfig:
    """Paths, binaries and the guest/host switch."""

    state_dir: Path = Path("/run/husk-agent")
    """Bundles (``bundles/<id>/config.json``) and console sockets live here."""
    shared_dir: Path = KATA_SHARED_DIR
    runc: str = "runc"
    runc_root: Path = Path("/run/husk-agent/runc")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cgroup_parent: str = "/husk"
    """Every container's cgroup is ``<cgroup_parent>/<container_id>``."""
    copy_file_root: Path = Path("/run")
    """CopyFile only writes below this directory."""
    resolv_conf: Path = Path("/etc/resolv.conf")
    proc_sys: Path = Path("/proc/sys")
    """Where the pod network's sysctls are written (the VM's network is the pod's)."""
    host_mode: bool = False
    secret_file: Path = FW_CFG_SECRET
    """The sandbox's channel secret: a vsock or unix peer must prove it (``guest.agent.auth``)."""
    sysfs: SysfsLayout = field(default_factory=SysfsLayout)

    def bundle_dir(self, container_id: str) -> Path:
        """The runc bundle of a container."""
        return self.state_dir / "bundles" / container_id

    @property
    def console_dir(self) -> Path:
        """Short paths for console sockets (a unix socket path has 108 bytes)."""
        return self.state_dir / "cs"

    def cgroups_path(self, container_id: str) -> str:
        """The cgroup (relative to the hierarchy root) runc puts a container in."""
        return f"{self.cgroup_parent.rstrip('/')}/{container_id}"


def check_id(kind: str, value: str) -> str:
    """Refuse ids that are empty or could escape a directory (``..``, ``/``)."""
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise InvalidArgumentError(
            f"{kind} id {value!r} is invalid: use 1-128 letters, digits, '_', '.', '-'"
        )
    return value
