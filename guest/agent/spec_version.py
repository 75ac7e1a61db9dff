"""Which runtime-spec version the agent writes into a container's ``config.json``.

containerd writes the version it was built with: 1.0.2-dev (1.6), 1.2.0 (1.7.24),
1.2.1 (2.1). The guest's runtime may be older: crun 1.8.1 refuses anything but
1.0.x ("unknown version specified"). The agent takes any 1.x and hands its
runtime the spec's version or, when that is newer than the runtime knows, the
newest the runtime knows. That is safe within a major version: the spec only
adds fields across minor versions, a runtime ignores the fields it does not
know, and the spec reaches the guest as Kata's protobuf, which carries no field
newer than 1.1 anyway. A major version other than 1 is refused.

What a runtime knows it says with ``<runtime> features`` (``ociVersionMax``);
that command came with runtime-spec 1.1, so a runtime without it knows 1.0.x
and gets :data:`PRE_FEATURES_VERSION`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidArgumentError

SUPPORTED_MAJOR = 1
#: what the agent assumes of a spec that names no version
DEFAULT_VERSION = "1.0.2"
#: what a runtime without ``features`` (crun < 1.9, runc < 1.1) is handed at most
PRE_FEATURES_VERSION = "1.0.2"

# semver as the runtime-spec uses it: MAJOR.MINOR.PATCH[-prerelease][+build]
_SEMVER = re.compile(
    r"^(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)


@dataclass(frozen=True)
class SpecVersion:
    """A parsed runtime-spec version; ``text`` is kept as it was written."""

    text: str
    major: int
    minor: int
    patch: int
    prerelease: str

    def precedes(self, other: SpecVersion) -> bool:
        """Whether this version is older than ``other`` (a prerelease before its release)."""
        return self._order() < other._order()

    def _order(self) -> tuple[int, int, int, int, str]:
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, self.prerelease)


def parse(text: str, what: str = "the OCI spec's ociVersion") -> SpecVersion:
    """Parse ``text``; a malformed version fails in one line naming ``what``."""
    found = _SEMVER.match(text.strip())
    if found is None:
        raise InvalidArgumentError(f"{what} {text!r} is not a runtime-spec version (X.Y.Z)")
    return SpecVersion(
        text.strip(),
        int(found["major"]),
        int(found["minor"]),
        int(found["patch"]),
        found["pre"] or "",
    )


def handed_version(spec_version: str, runtime_max: str) -> str:
    """The ``ociVersion`` to give a runtime that knows up to ``runtime_max``.

    Refuses a spec of a major version other than 1, whatever the runtime.
    """
    wanted = parse(spec_version or DEFAULT_VERSION)
    if wanted.major != SUPPORTED_MAJOR:
        raise InvalidArgumentError(
            f"the OCI spec's ociVersion {wanted.text} is not supported: "
            f"husk's agent takes runtime-spec {SUPPORTED_MAJOR}.x"
        )
    known = parse(runtime_max, "the OCI runtime's ociVersionMax")
    return known.text if known.precedes(wanted) else wanted.text
