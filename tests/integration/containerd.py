"""A real containerd on a temp root, state dir and socket, and ctr against it.

Shared by the integration tests (through conftest's fixtures) and the
benchmarks that measure containerd end to end. ``Containerd(base, env,
binaries)`` runs one release of the matrix (``containerd_versions``; the
system's 1.6 by default) with its own ``ctr`` and ``containerd-shim-runc-v2``,
a config file of the version that release reads natively (2 for 1.x, 3 for
2.x) and the plugins the tests never use disabled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tests.integration.containerd_versions import ContainerdBinaries

#: ctr 2.x prints the daemon's deprecation notices (cgroup v1 here) on stderr, which
#: the tests read as the command's own
CTR_ENV = {**os.environ, "CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS": "1"}
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
#: the system's release (1.6), for callers that name no other
SYSTEM = ContainerdBinaries("1.6", "system", Path(CONTAINERD).parent)
#: the CRI plugin: one plugin in 1.x; in 2.x the services it was split into
CRI_PLUGINS = {
    1: ["io.containerd.grpc.v1.cri"],
    2: [
        "io.containerd.grpc.v1.cri",
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.podsandbox.controller.v1.podsandbox",
    ],
}
#: what no test uses and only slows a start down or fills the log (by major version)
_UNUSED = {
    1: [
        "io.containerd.internal.v1.tracing",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
    ],
    2: [
        "io.containerd.internal.v1.tracing",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.snapshotter.v1.blockfile",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
    ],
}


def disabled_plugins(binaries: ContainerdBinaries, cri: bool) -> list[str]:
    """The ``disabled_plugins`` of a test containerd of this release, with or without CRI."""
    return _UNUSED[binaries.major] + ([] if cri else CRI_PLUGINS[binaries.major])


def shim_dir(base: Path, binaries: ContainerdBinaries) -> Path:
    """``base/bin``: husk's shim (this venv's) and the release's runc shim, first on PATH."""
    directory = base / "bin"
    directory.mkdir()
    husk = Path(sys.executable).parent / "containerd-shim-husk-v2"
    if husk.exists():
        (directory / husk.name).symlink_to(husk)
    (directory / binaries.runc_shim.name).symlink_to(binaries.runc_shim)
    return directory


class Containerd:
    """One containerd daemon on its own root, state dir and socket."""

    def __init__(
        self, base: Path, env: Mapping[str, str], binaries: ContainerdBinaries = SYSTEM
    ) -> None:
        self.base = base
        self.binaries = binaries
        self.address = str(base / "c.sock")
        self.bin = shim_dir(base, binaries)
        config = base / "containerd.toml"
        disabled = ", ".join(f'"{p}"' for p in disabled_plugins(binaries, cri=False))
        config.write_text(
            f'version = {binaries.config_version}\nroot = "{base / "root"}"\n'
            f'state = "{base / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.address}"\n'
        )
        self.env = {**os.environ, **env, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        self.log = open(base / "containerd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(binaries.containerd), "--config", str(config), "--log-level", "debug"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_text()[-2000:]}")
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("containerd did not answer in time")

    def ctr(
        self,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr --address <ours> <args>``; stdout and stderr as bytes."""
        proc = subprocess.run(
            [str(self.binaries.ctr), "--address", self.address, *args],
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            check=False,
            env=CTR_ENV,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}"
            )
        return proc

    def log_text(self) -> str:
        """containerd's log so far (shim logs included)."""
        return (self.base / "containerd.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop containerd, unmount what it mounted, remove its temp dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        for point in _mounts_under(self.base):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    return sorted(points, key=len, reverse=True)


def sandbox_dirs(state_root: Path) -> list[Path]:
    """The sandboxes' dirs in a husk state dir (not its host-wide ``.boot-slots``)."""
    if not state_root.exists():
        return []
    return sorted(p for p in state_root.iterdir() if not p.name.startswith("."))
