"""The machine's devices, listed as containerd lists a host's for a privileged container.

containerd's ``oci.WithHostDevices`` walks the host's ``/dev`` when it writes
the spec, so a privileged container's spec names the *host's* devices, with
the host's numbers; in the guest those numbers name other devices or none.
Under runc a privileged container gets the devices of the machine it runs on,
so the agent lists the guest's instead, by containerd's rules: every block,
character and FIFO device below ``/dev`` except ``console`` and what lives in
``pts``, ``shm``, ``fd``, ``mqueue`` and the ``.lxc``/``.lxd-mounts``/``.udev``
directories; symlinks are not followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

Json = dict[str, Any]

_SKIPPED_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
_TYPES = {stat.S_IFBLK: "b", stat.S_IFCHR: "c", stat.S_IFIFO: "p"}


def machine_devices(dev: Path = Path("/dev")) -> list[Json]:
    """The OCI ``linux.devices`` entries of every device below ``dev``, sorted by path."""
    found: list[Json] = []
    for directory, subdirs, files in os.walk(dev):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            if directory == str(dev) and name == "console":
                continue
            path = Path(directory) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone while we walked
            kind = _TYPES.get(stat.S_IFMT(st.st_mode))
            if kind is None:
                continue
            found.append(
                {
                    "path": str(path),
                    "type": kind,
                    "major": os.major(st.st_rdev),
                    "minor": os.minor(st.st_rdev),
                    "fileMode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid,
                    "gid": st.st_gid,
                }
            )
    return found
