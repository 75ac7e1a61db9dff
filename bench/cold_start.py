"""Cold start: ``ctr run --rm … /bin/true`` under husk, against the VM's own boot.

    python -m bench.cold_start [--rounds 5]

Each round, in one process and on one containerd (temp root and socket):

1. **boot**: the configured hypervisor plugin boots a sandbox VM and the shim's
   agent client polls ``Health.Check`` until the guest agent answers (plain
   QEMU boot to first answered Health.Check; no containerd, no shim);
2. **husk**: ``ctr run --runtime io.containerd.husk.v2 --rm busybox /bin/true``,
   end to end;
3. **runc**: the same with containerd's default runtime.

Prints the medians, the ratio husk / boot (target ≤ 1.10) and the shim's RSS
for one running sandbox (target ≤ 25 MB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import trio

from shim import busybox_image, config, registry
from shim.agent_client import wait_ready
from shim.host import HostFacts
from shim.hypervisor import VmSpec
from shim.state import SandboxState

IMAGE = busybox_image.REFERENCE


class Daemon:
    """containerd on a temp root, with husk's shim on PATH and its own husk config."""

    def __init__(self, base: Path, husk_config: Path) -> None:
        self.base = base
        self.address = str(base / "c.sock")
        bindir = base / "bin"
        bindir.mkdir()
        shim = Path(shutil.which("containerd-shim-husk-v2") or "")
        if shim.is_file():
            (bindir / shim.name).symlink_to(shim)
        cfg = base / "containerd.toml"
        cfg.write_text(
            f'version = 2\nroot = "{base / "root"}"\nstate = "{base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
        )
        env = {
            **os.environ,
            "HUSK_CONFIG": str(husk_config),
            "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
        }
        self.log = (base / "containerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while self.ctr("version").returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("containerd did not start")
            time.sleep(0.1)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", self.address, *args], capture_output=True, check=False
        )

    def timed_run(self, *runtime: str) -> float:
        started = time.monotonic()
        proc = self.ctr("run", *runtime, "--rm", IMAGE, "b-" + uuid.uuid4().hex[:8], "/bin/true")
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"ctr run {' '.join(runtime)} failed: {proc.stderr.decode()}")
        return elapsed

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(self.base))]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


async def boot_to_ready(cfg: config.Config, state_root: Path) -> float:
    """Seconds from ``prepare`` to the agent's first answered Health.Check."""
    plugin = registry.lookup(cfg.runtime.hypervisor)
    section = cfg.hypervisor
    state = SandboxState.create(state_root, "boot-" + uuid.uuid4().hex[:8])
    state.shared_dir.mkdir()
    initrd = section.get("initrd") or ""
    spec = VmSpec(
        sandbox_id=state.id,
        state_dir=state.dir,
        vcpus=int(section["default_vcpus"]),
        memory_mib=int(section["default_memory"]),
        kernel=Path(section["kernel"]),
        initrd=Path(initrd) if initrd else None,
        kernel_params=str(section.get("kernel_params", "")),
        shared_dir=state.shared_dir,
    )
    hypervisor = plugin.create(section)
    started = trio.current_time()
    try:
        await hypervisor.prepare(spec)
        await hypervisor.start(float(section.get("boot_timeout", 30)))
        async with wait_ready(hypervisor.agent_endpoint(), cfg.agent.dial_timeout):
            elapsed = trio.current_time() - started
    finally:
        with trio.CancelScope(shield=True):
            await hypervisor.destroy()
            shutil.rmtree(state.dir, ignore_errors=True)
    return elapsed


def shim_rss_mib(daemon: Daemon, state_root: Path) -> float:
    """VmRSS of the shim serving one running sandbox."""
    name = "rss-" + uuid.uuid4().hex[:8]
    proc = daemon.ctr("run", "--runtime", "io.containerd.husk.v2", "-d", IMAGE, name, "sleep", "60")
    if proc.returncode != 0:
        raise SystemExit(f"ctr run -d failed: {proc.stderr.decode()}")
    try:
        pid = SandboxState.load(state_root / name).shim_pid
        status = Path(f"/proc/{pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kib / 1024
    finally:
        daemon.ctr("task", "kill", "-s", "SIGKILL", name)
        time.sleep(0.5)
        daemon.ctr("task", "delete", "-f", name)
        daemon.ctr("container", "rm", name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.cold_start: run as root")
    base = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    state_root = base / "husk"
    state_root.mkdir()
    husk_config = base / "husk.toml"
    husk_config.write_text(f'[runtime]\nstate_dir = "{state_root}"\n')
    cfg = config.load(husk_config, host=HostFacts.probe())
    (base / "ctd").mkdir()
    daemon = Daemon(base / "ctd", husk_config)
    try:
        tarball = base / "busybox.tar"
        busybox_image.build(tarball)
        daemon.ctr("image", "import", str(tarball))
        daemon.timed_run()  # warm containerd's caches for both runtimes alike
        boots, husks, runcs = [], [], []
        for i in range(args.rounds):
            boots.append(trio.run(boot_to_ready, cfg, state_root))
            husks.append(daemon.timed_run("--runtime", "io.containerd.husk.v2"))
            runcs.append(daemon.timed_run())
            print(f"round {i + 1}: boot {boots[-1]:.2f}s  husk {husks[-1]:.2f}s  "
                  f"runc {runcs[-1]:.2f}s", flush=True)  # fmt: skip
        rss = shim_rss_mib(daemon, state_root)
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    boot, husk, runc = (statistics.median(x) for x in (boots, husks, runcs))
    print(f"boot-to-agent-ready median: {boot:.3f} s")
    print(f"husk ctr run --rm /bin/true median: {husk:.3f} s")
    print(f"runc ctr run --rm /bin/true median: {runc:.3f} s")
    print(f"ratio husk / boot: {husk / boot:.3f} (target <= 1.10)")
    print(f"shim RSS per sandbox: {rss:.1f} MiB (target <= 25 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
