"""Which containerd an operator runs, and the config file version it reads.

containerd 1.6 and 1.7 read config version 2 (CRI in one plugin,
``io.containerd.grpc.v1.cri``); containerd 2.x introduced version 3 (CRI split
into ``io.containerd.cri.v1.runtime`` and ``io.containerd.cri.v1.images``) and
still reads version 2, converting it. ``containerd --version`` says which runs:

    containerd github.com/containerd/containerd v1.6.20 2806fc1
    containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1
    containerd github.com/containerd/containerd/v2 2.1.9+unknown
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from shim.errors import HuskError

#: the oldest containerd husk's shim speaks to
OLDEST = (1, 6)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)?(?:[-~+.][0-9A-Za-z.~+-]*)?$")


class ContainerdVersionError(HuskError):
    """containerd's version cannot be found out, or husk does not support it."""


@dataclass(frozen=True, order=True)
class Release:
    """A containerd release line, ``major.minor``."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def config_version(self) -> int:
        """The config file version this containerd's own configs are written in."""
        return 3 if self.major >= 2 else 2

    def reads(self, config_version: int) -> bool:
        """Whether this containerd reads a config file of ``config_version``."""
        return config_version in ((2, 3) if self.major >= 2 else (2,))


def parse(text: str) -> Release:
    """``X.Y`` (or ``vX.Y.Z``, ``X.Y.Z~ds1``, ...) as a supported release."""
    found = _VERSION.match(text.strip())
    if found is None:
        raise ContainerdVersionError(f"containerd version {text.strip()!r} is not X.Y or X.Y.Z")
    release = Release(int(found[1]), int(found[2]))
    if (release.major, release.minor) < OLDEST:
        raise ContainerdVersionError(
            f"containerd {release} is not supported: husk needs containerd "
            f"{OLDEST[0]}.{OLDEST[1]} or newer"
        )
    return release


def from_version_output(output: str) -> Release:
    """The release in ``containerd --version``'s line (its third word)."""
    words = output.split()
    if len(words) < 3 or words[0] != "containerd":
        raise ContainerdVersionError(
            f"'containerd --version' said {output.strip()[:80]!r}, "
            "not 'containerd <module> <version>'"
        )
    return parse(words[2])


def detect(binary: str = "containerd") -> Release:
    """Run ``<binary> --version``; fail in one line when that cannot tell."""
    path = shutil.which(binary)
    if path is None:
        raise ContainerdVersionError(
            f"{binary} not found on PATH: pass --containerd-version X.Y to say which containerd"
        )
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ContainerdVersionError(f"'{path} --version' failed: {exc}") from None
    if done.returncode != 0:
        raise ContainerdVersionError(
            f"'{path} --version' exited {done.returncode}: {done.stderr.strip()[:200]}"
        )
    return from_version_output(done.stdout)
