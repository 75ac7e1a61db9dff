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
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import trio

from shim import config, registry
from shim.agent.client import wait_ready
from shim.cli import local_images
from shim.host import HostFacts
from shim.sandbox import factory
from shim.sandbox.state import SandboxState
from tests.integration.containerd import Containerd

IMAGE = local_images.BUSYBOX_REFERENCE


def timed_run(daemon: Containerd, *runtime: str) -> float:
    """Seconds for one ``ctr run --rm <runtime> busybox /bin/true``."""
    started = time.monotonic()
    name = "b-" + uuid.uuid4().hex[:8]
    proc = daemon.ctr("run", *runtime, "--rm", IMAGE, name, "/bin/true", check=False)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"ctr run {' '.join(runtime)} failed: {proc.stderr.decode()}")
    return elapsed


async def boot_to_ready(cfg: config.Config, state_root: Path) -> float:
    """Seconds from ``prepare`` to the agent's first answered Health.Check."""
    plugin = registry.lookup(cfg.runtime.hypervisor)
    section = cfg.hypervisor
    state = SandboxState.create(state_root, "boot-" + uuid.uuid4().hex[:8])
    state.shared_dir.mkdir()
    spec = factory.vm_spec(cfg, state)
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


def shim_memory_mib(daemon: Containerd, state_root: Path) -> tuple[float, float]:
    """(RSS, private memory) of the shim serving one running sandbox.

    RSS counts the interpreter's shared pages (libpython, libc, ...) in every
    shim; the private part (USS) is what each further sandbox adds.
    """
    name = "rss-" + uuid.uuid4().hex[:8]
    proc = daemon.ctr(
        "run", "--runtime", "io.containerd.husk.v2", "-d", IMAGE, name, "sleep", "60", check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"ctr run -d failed: {proc.stderr.decode()}")
    try:
        pid = SandboxState.load(state_root / name).shim_pid
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup if line.endswith("kB")}
        return kib["Rss"] / 1024, (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024
    finally:
        daemon.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        time.sleep(0.5)
        daemon.ctr("task", "delete", "-f", name, check=False)
        daemon.ctr("container", "rm", name, check=False)


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
    daemon = Containerd(base / "ctd", {"HUSK_CONFIG": str(husk_config)})
    try:
        tarball = base / "busybox.tar"
        local_images.build_busybox(tarball)
        daemon.ctr("image", "import", str(tarball))
        timed_run(daemon)  # warm containerd's caches for both runtimes alike
        boots, husks, runcs = [], [], []
        for i in range(args.rounds):
            boots.append(trio.run(boot_to_ready, cfg, state_root))
            husks.append(timed_run(daemon, "--runtime", "io.containerd.husk.v2"))
            runcs.append(timed_run(daemon))
            print(f"round {i + 1}: boot {boots[-1]:.2f}s  husk {husks[-1]:.2f}s  "
                  f"runc {runcs[-1]:.2f}s", flush=True)  # fmt: skip
        rss, private = shim_memory_mib(daemon, state_root)
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    boot, husk, runc = (statistics.median(x) for x in (boots, husks, runcs))
    print(f"boot-to-agent-ready median: {boot:.3f} s")
    print(f"husk ctr run --rm /bin/true median: {husk:.3f} s")
    print(f"runc ctr run --rm /bin/true median: {runc:.3f} s")
    print(f"ratio husk / boot: {husk / boot:.3f} (target <= 1.10)")
    print(f"shim RSS per sandbox: {rss:.1f} MiB (target <= 25 MB)")
    print(f"shim private memory (USS) per sandbox: {private:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
