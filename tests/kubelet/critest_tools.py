"""What the critest comparison needs on the host, provided into a cache outside the repository.

- ``crictl`` and ``critest`` from the Go module ``sigs.k8s.io/cri-tools`` at
  ``CRI_TOOLS_VERSION``: a ``go.mod`` generated in the cache that requires it,
  ``go build`` of ``cmd/crictl`` and ``go test -c`` of ``cmd/critest`` (no
  cri-tools source in the repository), plus the ``nonewprivs`` probe of
  ``probes/nonewprivs.go`` (our own program, built static).
- Debian packages of the host's own suite, fetched with ``apt-get download``
  and unpacked with ``dpkg -x`` beside each other, never installed:
  ``docker-registry`` (the loopback registry critest pulls from),
  ``nginx`` (the web server its networking and streaming specs reach) and
  ``busybox`` (the dynamic build, whose shell runs ``ls`` as a program and
  not as a built-in applet, as the busybox of critest's images does).

The cache is ``$HUSK_TEST_CRI_TOOLS_CACHE`` or ``/var/cache/husk-tests/cri-tools``;
everything is made in a temporary dir and renamed into place, under a lock,
so worktrees share it. Failures raise ``ProvisionError`` (one line).

``python -m tests.kubelet.critest_tools`` provides everything ahead of a run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.containerd_versions import (
    ProvisionError,
    _go,
    _go_env,
    _install,
    _locked,
    _run,
)

CRI_TOOLS_MODULE = "sigs.k8s.io/cri-tools"
CRI_TOOLS_VERSION = "v1.37.0"
CACHE_ENV = "HUSK_TEST_CRI_TOOLS_CACHE"
DEFAULT_CACHE = Path("/var/cache/husk-tests/cri-tools")
PROBES = Path(__file__).parent / "probes"
BUILD_TIMEOUT = 1800.0
#: Debian packages unpacked for the comparison (the host's own suite)
PACKAGES = ("docker-registry", "nginx", "busybox")


def cache_root() -> Path:
    """``$HUSK_TEST_CRI_TOOLS_CACHE`` or ``/var/cache/husk-tests/cri-tools``."""
    explicit = os.environ.get(CACHE_ENV)
    return Path(explicit) if explicit else DEFAULT_CACHE


@dataclass(frozen=True)
class CriTools:
    """The built binaries and the unpacked packages."""

    bin_dir: Path
    packages: Path

    @property
    def crictl(self) -> Path:
        return self.bin_dir / "crictl"

    @property
    def critest(self) -> Path:
        return self.bin_dir / "critest"

    @property
    def nonewprivs(self) -> Path:
        return self.bin_dir / "nonewprivs"

    @property
    def registry(self) -> Path:
        return self.packages / "docker-registry" / "usr" / "bin" / "docker-registry"

    @property
    def busybox(self) -> Path:
        return self.packages / "busybox" / "bin" / "busybox"

    @property
    def nginx(self) -> Path:
        return self.packages / "nginx" / "usr" / "sbin" / "nginx"


def _binaries(cache: Path) -> Path:
    target = cache / CRI_TOOLS_VERSION / "bin"
    probe_stamp = target / ".probes"
    probes = sorted(PROBES.glob("*.go"))
    stamp = "\n".join(f"{p.name} {p.stat().st_size} {int(p.stat().st_mtime)}" for p in probes)
    if target.is_dir() and probe_stamp.is_file() and probe_stamp.read_text() == stamp:
        return target
    go = _go()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        module = Path(tmp)
        (module / "go.mod").write_text(
            "module husk.invalid/cri-tools-build\n\ngo 1.24\n\n"
            f"require {CRI_TOOLS_MODULE} {CRI_TOOLS_VERSION}\n"
        )
        for probe in probes:
            (module / probe.stem).mkdir()
            shutil.copy(probe, module / probe.stem / "main.go")
        made = module / "bin"
        build = ["nice", "-n", "19", go]
        env = _go_env()
        what = f"cri-tools {CRI_TOOLS_VERSION}"
        _run([*build, "mod", "tidy"], f"go mod tidy for {what}", cwd=module, env=env,
             timeout=BUILD_TIMEOUT)  # fmt: skip
        _run([*build, "build", "-mod=mod", "-trimpath", "-o", f"{made}/",
              f"{CRI_TOOLS_MODULE}/cmd/crictl", *(f"./{p.stem}" for p in probes)],
             f"go build of crictl ({what})", cwd=module, env=env,
             timeout=BUILD_TIMEOUT)  # fmt: skip
        _run([*build, "test", "-mod=mod", "-trimpath", "-c", "-o", str(made / "critest"),
              f"{CRI_TOOLS_MODULE}/cmd/critest"],
             f"go test -c of critest ({what})", cwd=module, env=env,
             timeout=BUILD_TIMEOUT)  # fmt: skip
        (made / ".probes").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        _install(made, target)
    return target


def _packages(cache: Path) -> Path:
    target = cache / "debs"
    if all((target / name / ".unpacked").is_file() for name in PACKAGES):
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        for name in PACKAGES:
            if (target / name / ".unpacked").is_file():
                continue
            debs = work / name / "debs"
            debs.mkdir(parents=True)
            _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", name],
                 f"apt-get download {name}", cwd=debs)  # fmt: skip
            found = sorted(debs.glob(f"{name}_*.deb"))
            if len(found) != 1:
                raise ProvisionError(f"apt-get download {name} left {len(found)} packages")
            root = work / name / "root"
            _run(["dpkg", "-x", str(found[0]), str(root)], f"dpkg -x {found[0].name}")
            (root / ".unpacked").write_text(found[0].name + "\n")
            target.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target / name, ignore_errors=True)
            os.replace(root, target / name)
    return target


def provide(cache: Path | None = None) -> CriTools:
    """crictl, critest and the unpacked packages, built or fetched once into the cache."""
    cache = cache or cache_root()
    with _locked(cache):
        tools = CriTools(_binaries(cache), _packages(cache))
    for path in (
        tools.crictl,
        tools.critest,
        tools.nonewprivs,
        tools.registry,
        tools.nginx,
        tools.busybox,
    ):
        if not path.is_file():
            raise ProvisionError(f"cri-tools cache: {path} is missing")
    return tools


def main() -> int:
    began = time.monotonic()
    try:
        tools = provide()
    except ProvisionError as e:
        print(f"cri-tools: {e}", file=sys.stderr)
        return 1
    print(f"cri-tools {CRI_TOOLS_VERSION} in {tools.bin_dir}, packages in {tools.packages} "
          f"({time.monotonic() - began:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
