"""Build and run ``ttrpcpeer``, the Go ttrpc reference peer (``go/ttrpcpeer``).

The peer is compiled offline from Debian's ``golang-github-containerd-ttrpc-dev``
in GOPATH mode (``GO111MODULE=off``, ``GOPATH=/usr/share/gocode``, ``GOPROXY=off``):
Debian lays Go libraries out as a GOPATH tree and ships no module cache, so
module mode cannot resolve them without a network. The binary is cached under
``~/.cache/husk/ttrpcpeer/<hash>/`` keyed by the peer's source, the Go version
and the ttrpc library source, so a second run (or CI on the same machine) does
not rebuild.

Shared by ``tests/conformance`` and ``bench``; one copy of the build code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SOURCE_DIR = Path(__file__).resolve().parent / "go" / "ttrpcpeer"
APT_PACKAGES_FILE = Path(__file__).resolve().parent / "apt-packages.txt"
DEBIAN_GOPATH = Path("/usr/share/gocode")
TTRPC_SOURCE = DEBIAN_GOPATH / "src" / "github.com" / "containerd" / "ttrpc"

SERVICE = "husk.test.Echo"
# Debian's ttrpc (1.1.1) caps a frame's payload at 4 MiB and has no streams.
MAX_MESSAGE = 4 << 20

_INSTALL_HINT = (
    "install the Debian packages listed in {file} (xargs -a {file} apt-get install -y) and retry"
)


class GoPeerError(RuntimeError):
    """The Go peer could not be built or started."""


def cache_root() -> Path:
    """``$HUSK_CACHE_DIR`` or ``$XDG_CACHE_HOME/husk`` or ``~/.cache/husk``."""
    explicit = os.environ.get("HUSK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "husk"


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise GoPeerError(
            "cannot build the Go ttrpc peer: no `go` on PATH; "
            + _INSTALL_HINT.format(file=APT_PACKAGES_FILE)
        )
    return go


def build_env(cache: Path) -> dict[str, str]:
    """The environment of an offline GOPATH-mode build against Debian's tree."""
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=str(DEBIAN_GOPATH),
        GOPROXY="off",
        GOFLAGS="",
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        GOCACHE=str(cache / "go-build"),
    )
    return env


def source_hash(go: str) -> str:
    """Hash of everything the binary depends on that can change on this machine."""
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.rglob("*.go")):
        h.update(path.relative_to(SOURCE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    for path in sorted(TTRPC_SOURCE.glob("*.go")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    version = subprocess.run(
        [go, "version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    h.update(version.encode())
    return h.hexdigest()[:16]


def build_peer(cache: Path | None = None) -> Path:
    """Return the path of the built ``ttrpcpeer``, building it if not cached."""
    if not TTRPC_SOURCE.is_dir():
        raise GoPeerError(
            f"cannot build the Go ttrpc peer: {TTRPC_SOURCE} is missing; "
            + _INSTALL_HINT.format(file=APT_PACKAGES_FILE)
        )
    go = _go()
    cache = cache or cache_root()
    target = cache / "ttrpcpeer" / source_hash(go) / "ttrpcpeer"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "ttrpcpeer"
        proc = subprocess.run(
            [go, "build", "-trimpath", "-o", str(out), "."],
            cwd=SOURCE_DIR,
            env=build_env(cache),
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if proc.returncode != 0:
            raise GoPeerError(
                f"go build of {SOURCE_DIR} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()}\n" + _INSTALL_HINT.format(file=APT_PACKAGES_FILE)
            )
        os.replace(out, target)  # atomic: concurrent builders agree on the result
    return target


def parse_lines(stdout: bytes | str) -> list[dict[str, Any]]:
    """The JSON lines a peer printed, in order."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class ClientResult:
    """What one ``ttrpcpeer client`` run printed."""

    argv: list[str]
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    @property
    def line(self) -> dict[str, Any]:
        """The single result line of a client mode."""
        if len(self.lines) != 1:
            raise AssertionError(f"expected one JSON line from {self.argv}, got {self.lines!r}")
        return self.lines[0]

    def describe(self) -> str:
        return f"{' '.join(self.argv)} -> exit {self.returncode}\n{self.lines}\n{self.stderr}"


def client_argv(binary: Path, socket: Path | str, mode: str, *args: str) -> list[str]:
    return [str(binary), "client", "-socket", str(socket), "-mode", mode, *args]


def result_of(argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> ClientResult:
    text = stderr.decode(errors="replace")
    return ClientResult(list(argv), returncode, parse_lines(stdout), text)


def run_client(
    binary: Path, socket: Path | str, mode: str, *args: str, timeout: float = 60
) -> ClientResult:
    """Run ``ttrpcpeer client`` synchronously (for servers not on this thread's loop)."""
    argv = client_argv(binary, socket, mode, *args)
    proc = subprocess.run(argv, capture_output=True, check=False, timeout=timeout)
    return result_of(argv, proc.returncode, proc.stdout, proc.stderr)


def run_bench_client(
    binary: Path, socket: Path | str, callers: int, seconds: float, size: int = 16
) -> dict[str, Any]:
    """Run ``ttrpcpeer bench-client``; returns its ``{"calls","seconds","rate",...}``."""
    argv = [
        str(binary), "bench-client", "-socket", str(socket),
        "-callers", str(callers), "-seconds", str(seconds), "-size", str(size),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, check=False, timeout=seconds + 60)
    if proc.returncode != 0:
        raise GoPeerError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")
    lines = parse_lines(proc.stdout)
    return lines[-1]


@dataclass
class GoServer:
    """A running ``ttrpcpeer server``."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    ready: dict[str, Any] = field(default_factory=dict)

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far (logrus errors, panics)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 5) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        return self.process.returncode


@contextlib.contextmanager
def go_server(
    binary: Path, socket: Path, *, mode: str = "server", startup_timeout: float = 10
) -> Iterator[GoServer]:
    """Start ``ttrpcpeer server -socket SOCKET``; wait for it to listen; stop it after."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- owned by GoServer, closed in stop()
    proc = subprocess.Popen(
        [str(binary), mode, "-socket", str(socket)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    server = GoServer(socket, proc, log)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + startup_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GoPeerError(f"ttrpcpeer {mode} did not listen on {socket} in time")
            readable, _, _ = select.select([proc.stdout], [], [], left)
            if readable:
                line = proc.stdout.readline()
                if not line:
                    proc.wait(startup_timeout)
                    raise GoPeerError(
                        f"ttrpcpeer {mode} exited before listening: {server.stderr_text()}"
                    )
                server.ready = json.loads(line)
                break
        yield server
    finally:
        server.stop()
