"""A real containerd on a temp root, state dir and socket, and ctr against it.

Shared by the integration tests (through conftest's fixtures) and the
benchmarks that measure containerd end to end.
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

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.tracing",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
]


class Containerd:
    """One containerd daemon on its own root, state dir and socket."""

    def __init__(self, base: Path, env: Mapping[str, str]) -> None:
        self.base = base
        self.address = str(base / "c.sock")
        self.bin = base / "bin"
        self.bin.mkdir()
        shim = Path(sys.executable).parent / "containerd-shim-husk-v2"
        if shim.exists():
            (self.bin / shim.name).symlink_to(shim)
        config = base / "containerd.toml"
        disabled = ", ".join(f'"{p}"' for p in _DISABLED)
        config.write_text(
            f'version = 2\nroot = "{base / "root"}"\nstate = "{base / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.address}"\n'
        )
        self.env = {**os.environ, **env, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        self.log = open(base / "containerd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [CONTAINERD, "--config", str(config), "--log-level", "debug"],
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
            [CTR, "--address", self.address, *args],
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            check=False,
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
