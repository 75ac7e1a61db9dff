"""Debian packages: resolve versions, download with ``apt-get download``, unpack with dpkg-deb.

Every external command goes through a ``Runner`` so tests can point PATH at fake
tools; the default runner turns "not installed" and non-zero exits into one-line
``ImageBuildError``\\ s.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from guest.image.errors import AptError, CommandError, ToolMissingError

# Which Debian package provides each host tool the build runs.
TOOL_PACKAGES: Mapping[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "zstd": "zstd",
    "mkfs.erofs": "erofs-utils",
}
#: where a root-only tool lives when PATH (a user's) leaves out the sbin directories
_SBIN = ("/usr/sbin", "/sbin")


def tool_path(tool: str) -> str | None:
    """``tool`` on PATH or in the sbin directories, or None."""
    return shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(_SBIN))


Runner = Callable[[Sequence[str], Path], str]
"""Run argv in a directory and return its stdout; raise ``ImageBuildError`` on failure."""


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    pick = errors[-1] if errors else (lines[-1] if lines else "no output")
    return pick.removeprefix("E:").strip()


def subprocess_runner(env: Mapping[str, str] | None = None) -> Runner:
    """The default runner: ``subprocess.run`` with captured output, optional environment."""

    def run(argv: Sequence[str], cwd: Path) -> str:
        tool = argv[0]
        try:
            proc = subprocess.run(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                capture_output=True,
                check=False,
            )
        except FileNotFoundError:
            name = Path(tool).name
            raise ToolMissingError(name, TOOL_PACKAGES.get(name, name)) from None
        if proc.returncode != 0:
            detail = _last_error_line(proc.stderr.decode(errors="replace"))
            words = [a for a in argv[1:] if not a.startswith("-") and "::" not in a][:1]
            what = " ".join([Path(tool).name, *words])
            if tool.startswith("apt"):
                raise AptError(
                    f"'{what}' failed (exit {proc.returncode}): {detail}; check access to the "
                    "Debian mirror and run 'apt-get update'"
                )
            raise CommandError(f"'{what}' failed (exit {proc.returncode}): {detail}")
        return proc.stdout.decode(errors="replace")

    return run


def _apt_options() -> list[str]:
    opts = ["-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # apt drops to the _apt user for downloads, which cannot write a root-owned temp dir.
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


@dataclass(frozen=True)
class Deb:
    """One package as apt will download it."""

    name: str
    version: str
    filename: str
    size: int
    sha256: str


def resolve_kernel_package(run: Runner, workdir: Path, meta: str) -> str:
    """``linux-image-amd64`` -> the concrete ``linux-image-<abi>-amd64`` it depends on."""
    out = run(["apt-cache", "show", "--no-all-versions", meta], workdir)
    for line in out.splitlines():
        if line.startswith("Depends:"):
            for dep in line.removeprefix("Depends:").split(","):
                name = dep.strip().split()[0] if dep.strip() else ""
                if name.startswith("linux-image-") and name != meta:
                    return name
    raise AptError(f"apt-cache shows no linux-image dependency for '{meta}': run apt-get update")


_URI_LINE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+) (?P<size>\d+) (?P<hash>\S+)")


def parse_print_uris(text: str) -> list[Deb]:
    """Parse ``apt-get download --print-uris`` output."""
    debs = []
    for line in text.splitlines():
        m = _URI_LINE.match(line.strip())
        if not m:
            continue
        filename = unquote(m["file"])
        parts = filename.removesuffix(".deb").split("_")
        if len(parts) != 3:
            raise AptError(f"unexpected package file name from apt-get: {filename}")
        algo, _, digest = m["hash"].partition(":")
        debs.append(
            Deb(
                name=parts[0],
                version=parts[1].replace("%3a", ":"),
                filename=filename,
                size=int(m["size"]),
                sha256=digest.lower() if algo.upper() == "SHA256" else "",
            )
        )
    return debs


def resolve(run: Runner, workdir: Path, names: Sequence[str]) -> list[Deb]:
    """Candidate version, file name and hash of each package (downloads nothing).

    ``workdir`` must not already hold the .deb files, or apt leaves them out.
    """
    out = run(["apt-get", *_apt_options(), "download", "--print-uris", *names], workdir)
    debs = {d.name: d for d in parse_print_uris(out)}
    missing = [n for n in names if n not in debs]
    if missing:
        raise AptError(f"apt-get resolved no download for {', '.join(missing)}: run apt-get update")
    return [debs[n] for n in names]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(run: Runner, workdir: Path, debs: Sequence[Deb]) -> list[Path]:
    """Download exactly the resolved versions into ``workdir`` and check their hashes."""
    pins = [f"{d.name}={d.version}" for d in debs]
    run(["apt-get", *_apt_options(), "download", *pins], workdir)
    paths = []
    for deb in debs:
        path = workdir / deb.filename
        if not path.exists():
            found = sorted(workdir.glob(f"{deb.name}_*.deb"))
            if not found:
                raise AptError(f"apt-get download did not produce {deb.filename}")
            path = found[0]
        if deb.sha256 and sha256_file(path) != deb.sha256:
            raise AptError(f"{path.name}: sha256 does not match the apt index: run apt-get update")
        paths.append(path)
    return paths


def extract(run: Runner, debs: Sequence[Path], dest: Path) -> None:
    """Unpack each .deb's data into ``dest`` (``dpkg-deb -x``; no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(dest)], dest)
