"""The containerd releases the suite runs against, provided into a cache outside the repository.

Each release line has one source; none is ever installed over the system's:

- ``1.6``: the system's own (Debian 12's ``containerd`` package, 1.6.20):
  ``/usr/bin/containerd``, ``ctr`` and ``containerd-shim-runc-v2``.
- ``1.7``: Debian 13 (trixie)'s ``containerd`` package (1.7.24). ``apt-get
  download`` fetches it through a throw-away sources list in the cache (its
  own lists and archives, none of the host's sources, preferences or lists),
  whose archive address is the host's own Debian archive, read from
  ``/etc/apt/sources.list`` and ``/etc/apt/sources.list.d/*``; ``dpkg -x``
  unpacks it. Its binaries keep Debian's names (``usr/bin/containerd``,
  ``ctr``, ``containerd-shim-runc-v2``).
- ``2.4``: ``github.com/containerd/containerd/v2`` at the newest v2.4.x the Go
  module proxy serves, built from a ``go.mod`` generated in the cache (no
  containerd source in the repository): ``go build`` of ``cmd/containerd``,
  ``cmd/ctr`` and ``cmd/containerd-shim-runc-v2``, static (``CGO_ENABLED=0``,
  which also leaves out the btrfs snapshotter and its C headers). The
  module's ``go`` directive wants a recent Go: ``/usr/local/go/bin/go`` or
  the ``go`` on PATH, whichever is new enough.

Every release drives the system's ``runc`` (``/usr/sbin/runc``) through its
own ``containerd-shim-runc-v2``. The cache is ``$HUSK_TEST_CONTAINERD_CACHE``
or ``/var/cache/husk-tests/containerd``: ``<cache>/<line>/<version>/bin``,
made in a temporary dir and renamed into place, so a half-made release is
never used; providers in several processes (worktrees) serialize on a lock
per line. A release that cannot be provided raises ``ProvisionError``, which
the fixtures turn into a skip, and ``tests/run`` into a failure.

``python -m tests.integration.containerd_versions [LINE ...]`` provides them
ahead of a run and prints where each one is and how long it took.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.containerd import releases

CACHE_ENV = "HUSK_TEST_CONTAINERD_CACHE"
DEFAULT_CACHE = Path("/var/cache/husk-tests/containerd")
#: the binaries every release provides, by the names containerd looks for
BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
GO_MODULE = "github.com/containerd/containerd/v2"
GO_CANDIDATES = ("/usr/local/go/bin/go", "go")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: a fetch or a build that takes longer than this has hung
FETCH_TIMEOUT = 600.0
BUILD_TIMEOUT = 1800.0


class ProvisionError(RuntimeError):
    """A containerd release could not be fetched or built (one line: what and why)."""


@dataclass(frozen=True)
class ContainerdBinaries:
    """One containerd release: where its binaries are and what it calls itself."""

    line: str
    version: str
    bin_dir: Path

    @property
    def containerd(self) -> Path:
        """The daemon."""
        return self.bin_dir / "containerd"

    @property
    def ctr(self) -> Path:
        """Its client."""
        return self.bin_dir / "ctr"

    @property
    def runc_shim(self) -> Path:
        """Its own ``containerd-shim-runc-v2`` (a 2.x daemon speaks to a 2.x shim)."""
        return self.bin_dir / "containerd-shim-runc-v2"

    @property
    def major(self) -> int:
        """1 or 2."""
        return int(self.line.split(".")[0])

    @property
    def config_version(self) -> int:
        """The ``version`` of the config file the release reads natively (3 since 2.0)."""
        return releases.parse(self.line).config_version


def cache_root() -> Path:
    """``$HUSK_TEST_CONTAINERD_CACHE`` or ``/var/cache/husk-tests/containerd``."""
    explicit = os.environ.get(CACHE_ENV)
    return Path(explicit) if explicit else DEFAULT_CACHE


def reported_version(containerd: Path) -> str:
    """The version ``containerd --version`` prints (its third word)."""
    try:
        out = subprocess.run(
            [str(containerd), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError as e:
        raise ProvisionError(f"{containerd}: cannot run it: {e.strerror}") from None
    words = out.split()
    if len(words) < 3:
        raise ProvisionError(f"{containerd} --version printed {out.strip()!r}")
    return words[2]


def _check(binaries: ContainerdBinaries) -> ContainerdBinaries:
    missing = [str(binaries.bin_dir / b) for b in BINARIES if not (binaries.bin_dir / b).is_file()]
    if missing:
        raise ProvisionError(f"containerd {binaries.line}: missing {', '.join(missing)}")
    if not binaries.version.lstrip("v").startswith(binaries.line + "."):
        raise ProvisionError(
            f"containerd {binaries.line}: {binaries.containerd} is version {binaries.version}"
        )
    return binaries


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _install(made: Path, target: Path) -> None:
    """Move a finished ``bin`` dir into the cache in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(made, target)


# ---- 1.6: the system's ----


def system() -> ContainerdBinaries:
    """Debian 12's containerd, as installed (``tests/apt-packages.txt``)."""
    bin_dir = Path("/usr/bin")
    if not (bin_dir / "containerd").is_file():
        raise ProvisionError(
            "containerd 1.6: /usr/bin/containerd is missing: apt-get install containerd"
        )
    return _check(ContainerdBinaries("1.6", reported_version(bin_dir / "containerd"), bin_dir))


# ---- 1.7: a Debian package of another suite ----


def host_archive(sources: Sequence[Path] | None = None, codename: str | None = None) -> str:
    """The URI of the host's Debian archive: a ``deb`` source for the host's own suite."""
    codename = codename or _host_codename()
    if sources is None:
        parts = Path("/etc/apt/sources.list.d")
        sources = [Path("/etc/apt/sources.list")]
        if parts.is_dir():
            sources += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for types, uris, suites in entries:
            if "deb" in types and codename in suites and uris:
                return uris[0].rstrip("/")
    raise ProvisionError(
        f"no apt source of the host's suite {codename!r} in /etc/apt/sources.list*: "
        "cannot tell where the Debian archive is"
    )


def _host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    raise ProvisionError("/etc/os-release has no VERSION_CODENAME")


def _one_line_entries(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    entries = []
    for raw in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 3:
            entries.append(([line[0]], [line[1]], [line[2]]))
    return entries


def _deb822_entries(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if fields.get("enabled", ["yes"])[0].lower() == "no":
            continue
        entries.append((fields.get("types", []), fields.get("uris", []), fields.get("suites", [])))
    return entries


def apt_options(work: Path) -> list[str]:
    """apt options that use only ``work``'s sources list, lists and archives."""
    return [
        "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", "Dir::Etc::Preferences=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=/dev/null",
        "-o", f"Dir::State::Lists={work / 'lists'}",
        "-o", f"Dir::Cache={work / 'cache'}",
        "-o", "Acquire::Languages=none",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def debian_package(line: str, suite: str, cache: Path | None = None) -> ContainerdBinaries:
    """Debian ``suite``'s ``containerd`` package, unpacked in the cache (fetched once)."""
    directory = (cache or cache_root()) / line
    with _locked(directory):
        found = _cached(line, directory)
        if found is not None:
            return found
        work = directory / "apt"
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        (work / "sources.list").write_text(
            f"deb [signed-by={DEBIAN_KEYRING}] {host_archive()} {suite} main\n"
        )
        options = apt_options(work)
        _run(["apt-get", *options, "-q", "update"], f"apt-get update for {suite}")
        for stale in (work / "debs").glob("*.deb"):
            stale.unlink()
        _run(
            ["apt-get", *options, "download", f"containerd/{suite}"],
            f"apt-get download containerd/{suite}",
            cwd=work / "debs",
        )
        debs = sorted((work / "debs").glob("containerd_*.deb"))
        if len(debs) != 1:
            raise ProvisionError(f"apt-get download containerd/{suite} left {len(debs)} packages")
        deb = debs[0]
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            root = Path(tmp) / "root"
            _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")
            made = Path(tmp) / "bin"
            made.mkdir()
            for name in BINARIES:
                shutil.move(root / "usr" / "bin" / name, made / name)
            version = reported_version(made / "containerd")
            _check(ContainerdBinaries(line, version, made))
            _install(made, directory / _safe(version) / "bin")
        return _check(ContainerdBinaries(line, version, directory / _safe(version) / "bin"))


# ---- 2.4: built from its Go module ----


def go_module(line: str, cache: Path | None = None) -> ContainerdBinaries:
    """The newest ``v<line>.x`` of containerd's Go module, built once into the cache."""
    directory = (cache or cache_root()) / line
    go = _go()
    with _locked(directory):
        try:
            version = newest_module_version(go, line)
        except ProvisionError:
            # no proxy (offline): the newest release built before will do
            found = _cached(line, directory)
            if found is None:
                raise
            return found
        target = directory / version / "bin"
        if target.is_dir():
            return _check(ContainerdBinaries(line, reported_version(target / "containerd"), target))
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            module = Path(tmp)
            (module / "go.mod").write_text(
                f"module husk.invalid/containerd-build\n\ngo 1.24\n\n"
                f"require {GO_MODULE} {version}\n"
            )
            made = module / "bin"
            _run(
                ["nice", "-n", "19", go, "build", "-mod=mod", "-trimpath", "-o", f"{made}/",
                 *(f"{GO_MODULE}/cmd/{name}" for name in BINARIES)],
                f"go build of containerd {version}",
                cwd=module,
                env=_go_env(),
                timeout=BUILD_TIMEOUT,
            )  # fmt: skip
            found_version = reported_version(made / "containerd")
            _check(ContainerdBinaries(line, found_version, made))
            _install(made, target)
        return _check(ContainerdBinaries(line, found_version, target))


def newest_module_version(go: str, line: str) -> str:
    """The newest release ``v<line>.N`` the Go module proxy lists."""
    out = _run(
        [go, "list", "-m", "-versions", GO_MODULE], "go list -m -versions", cwd=Path("/"),
        env=_go_env(),
    )  # fmt: skip
    return newest_release(out.split()[1:], line)


def newest_release(versions: Sequence[str], line: str) -> str:
    """The highest ``v<line>.N`` among ``versions`` (pre-releases such as -rc.1 left out)."""
    prefix = f"v{line}."
    releases = [v for v in versions if v.startswith(prefix) and v[len(prefix) :].isdigit()]
    if not releases:
        raise ProvisionError(f"the Go module proxy lists no {prefix}x of {GO_MODULE}")
    return max(releases, key=lambda v: int(v[len(prefix) :]))


def _go() -> str:
    for candidate in GO_CANDIDATES:
        path = shutil.which(candidate)
        if path is None:
            continue
        out = subprocess.run([path, "version"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"go(\d+)\.(\d+)", out)
        if found and (int(found.group(1)), int(found.group(2))) >= (1, 26):
            return path
    raise ProvisionError(
        "containerd 2.4 needs Go >= 1.26 to build: none at /usr/local/go/bin/go or on PATH"
    )


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # the toolchain found is the one used: never fetch another one
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="")
    return env


# ---- common ----


def _cached(line: str, directory: Path) -> ContainerdBinaries | None:
    """The newest release of ``line`` already in the cache, if any."""
    made = sorted(
        (p for p in directory.glob("*/bin") if (p / "containerd").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if not made:
        return None
    return _check(ContainerdBinaries(line, reported_version(made[-1] / "containerd"), made[-1]))


def _safe(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", version)


_RUNNING: set[subprocess.Popen[str]] = set()
_RUNNING_LOCK = threading.Lock()
_CANCELLED = threading.Event()


def cancel() -> None:
    """Stop the fetches and builds under way (the test session is over); they raise."""
    _CANCELLED.set()
    with _RUNNING_LOCK:
        for proc in _RUNNING:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)


def _run(
    argv: Sequence[str],
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = FETCH_TIMEOUT,
) -> str:
    if _CANCELLED.is_set():
        raise ProvisionError(f"{what}: cancelled")
    try:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
    except OSError as e:
        raise ProvisionError(f"{what}: {e.strerror}") from None
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ProvisionError(f"{what}: no result after {timeout:.0f} s") from None
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    if proc.returncode != 0:
        last = (stderr.strip() or stdout.strip()).splitlines()[-3:]
        raise ProvisionError(f"{what} failed (exit {proc.returncode}): {' | '.join(last)}")
    return stdout


#: how each release line the suite knows is provided
SOURCES = {
    "1.6": lambda: system(),
    "1.7": lambda: debian_package("1.7", "trixie"),
    "2.4": lambda: go_module("2.4"),
}


def provide(line: str) -> ContainerdBinaries:
    """The binaries of release ``line`` (``1.6``, ``1.7``, ``2.4``), fetching or building them."""
    source = SOURCES.get(line)
    if source is None:
        raise ProvisionError(f"containerd {line}: the suite knows {', '.join(SOURCES)}")
    return source()


def main(argv: Sequence[str]) -> int:
    """Provide the named lines (all by default); print each one's place and time."""
    code = 0
    for line in argv or list(SOURCES):
        began = time.monotonic()
        try:
            found = provide(line)
        except ProvisionError as e:
            print(f"{line}: {e}", file=sys.stderr)
            code = 1
            continue
        print(f"{line}: {found.version} in {found.bin_dir} ({time.monotonic() - began:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
