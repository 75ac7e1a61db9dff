"""Warm starts: sandboxes cloned from a VM template or taken from a VM pool, against cold boots.

    python -m bench.warm_start [--rounds 5] [--parallel 10] [--idle 5]

From one run, on three containerd daemons of its own (one whose shims boot
cold, one whose shims clone ``[factory]``'s template, one whose shims take
VMs from a VM pool of ``--parallel`` template clones, full before each of its
runs, untimed):

1. ``ctr run --rm busybox /bin/true``: cold, warm (after one start that makes
   the template), pool and runc, ``--rounds`` each, medians;
2. the memory (PSS, of QEMU and the shim) of an idle sandbox (``sleep``),
   cold, cloned and from the pool, and the sum for ``--idle`` idle clones at once;
3. ``--parallel`` ``ctr run`` started at once, pool, warm and cold: how many
   answered and how long the slowest took;
4. last, the lines ``warm/cold: X.XX`` (target ≤ 0.25; warm ≤ 10 times runc)
   and ``pool/runc: X.XX``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.pod_start import pool_full
from shim.cli import local_images
from shim.resources import PROCESS
from shim.sandbox.cleanup import processes_naming
from shim.sandbox.state import SandboxState
from tests.integration.containerd import CTR, Containerd

IMAGE = local_images.BUSYBOX_REFERENCE
HUSK = ["--runtime", "io.containerd.husk.v2"]


def timed_run(daemon: Containerd, *runtime: str) -> float:
    """Seconds for one ``ctr run --rm <runtime> busybox /bin/true``."""
    started = time.monotonic()
    name = "w-" + uuid.uuid4().hex[:8]
    proc = daemon.ctr("run", *runtime, "--rm", IMAGE, name, "/bin/true", check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ctr run {' '.join(runtime)} failed: {proc.stderr.decode()}")
    return time.monotonic() - started


def pss_mib(pid: int) -> float:
    """Proportional set size of one process, MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def idle_pss(daemon: Containerd, state_root: Path, count: int) -> list[float]:
    """PSS (QEMU + shim) of each of ``count`` idle sandboxes running at once."""
    names = ["i-" + uuid.uuid4().hex[:8] for _ in range(count)]
    try:
        for name in names:
            daemon.ctr("run", *HUSK, "-d", IMAGE, name, "sleep", "600")
        time.sleep(5)  # settle: the guest is idle
        sizes = []
        for name in names:
            state = SandboxState.load(state_root / name)
            # a pool VM's QEMU names the pool's dir, not the sandbox's: its record has it
            vmm = {r.pid for r in state.resources if r.kind == PROCESS}
            vmm |= {p for p in processes_naming(state_root / name) if p != state.shim_pid}
            sizes.append(sum(pss_mib(p) for p in [*vmm, state.shim_pid]))
        return sizes
    finally:
        for name in names:
            daemon.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        time.sleep(1)
        for name in names:
            daemon.ctr("task", "delete", "-f", name, check=False)
            daemon.ctr("container", "rm", name, check=False)


def at_once(daemon: Containerd, count: int) -> tuple[int, float]:
    """Start ``count`` husk ``ctr run --rm`` at once: (how many succeeded, slowest seconds)."""
    argv = [CTR, "--address", daemon.address, "run", *HUSK, "--rm", IMAGE]
    started = time.monotonic()
    procs = [
        subprocess.Popen([*argv, "p-" + uuid.uuid4().hex[:8], "/bin/true"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]  # fmt: skip
    ok, slowest = 0, 0.0
    for proc in procs:
        ok += proc.wait(timeout=900) == 0
        slowest = max(slowest, time.monotonic() - started)
    return ok, slowest


def daemon_for(base: Path, name: str, extra: str) -> tuple[Containerd, Path]:
    """A containerd whose husk shims use a config of their own; (daemon, state root)."""
    state_root = base / f"{name}-state"
    config = base / f"{name}.toml"
    config.write_text(f'[runtime]\nstate_dir = "{state_root}"\n{extra}')
    (base / name).mkdir()
    daemon = Containerd(base / name, {"HUSK_CONFIG": str(config)})
    daemon.ctr("image", "import", str(local_images.build_busybox(base / f"{name}.tar")))
    return daemon, state_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--idle", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.warm_start: run as root")
    base = Path(tempfile.mkdtemp(prefix="hw-", dir="/tmp"))
    template = base / "template"
    factory = f'[factory]\nenable_template = true\ntemplate_path = "{template}"\n'
    pooled = f'vm_cache_number = {args.parallel}\nvm_cache_endpoint = "{base / "pool.sock"}"\n'
    cold_ctd, cold_root = daemon_for(base, "cold", "")
    warm_ctd, warm_root = daemon_for(base, "warm", factory)
    pool_ctd, pool_root = daemon_for(base, "pool", factory + pooled)
    pool_toml = base / "pool.toml"
    husk = str(Path(sys.executable).parent / "husk")
    try:
        timed_run(cold_ctd)  # warm containerd's caches for runc
        print(f"template made by the first warm start: {timed_run(warm_ctd, *HUSK):.2f} s")
        subprocess.run([husk, "--config", str(pool_toml), "factory", "init"], check=True)
        print(f"pool of {args.parallel} full: {pool_full(pool_toml):.2f} s", flush=True)
        colds, warms, pools, runcs = [], [], [], []
        for i in range(args.rounds):
            colds.append(timed_run(cold_ctd, *HUSK))
            warms.append(timed_run(warm_ctd, *HUSK))
            pool_full(pool_toml)
            pools.append(timed_run(pool_ctd, *HUSK))
            runcs.append(timed_run(cold_ctd))
            print(f"round {i + 1}: cold {colds[-1]:.2f}s  warm {warms[-1]:.2f}s  "
                  f"pool {pools[-1]:.2f}s  runc {runcs[-1]:.2f}s", flush=True)  # fmt: skip
        cold_pss = idle_pss(cold_ctd, cold_root, 1)[0]
        clone_pss = idle_pss(warm_ctd, warm_root, args.idle)
        pool_full(pool_toml)
        pool_pss = idle_pss(pool_ctd, pool_root, 1)[0]
        pool_full(pool_toml)
        pool_ok, pool_slowest = at_once(pool_ctd, args.parallel)
        warm_ok, warm_slowest = at_once(warm_ctd, args.parallel)
        cold_ok, cold_slowest = at_once(cold_ctd, args.parallel)
    finally:
        for config in ("warm.toml", "pool.toml"):
            subprocess.run([husk, "--config", str(base / config), "factory", "destroy"],
                           capture_output=True, check=False)  # fmt: skip
        cold_ctd.stop()
        warm_ctd.stop()
        pool_ctd.stop()
        shutil.rmtree(base, ignore_errors=True)
    cold, warm, pool, runc = (statistics.median(x) for x in (colds, warms, pools, runcs))
    print(f"cold ctr run --rm /bin/true median: {cold:.3f} s")
    print(f"warm ctr run --rm /bin/true median: {warm:.3f} s")
    print(f"pool ctr run --rm /bin/true median: {pool:.3f} s")
    print(f"runc ctr run --rm /bin/true median: {runc:.3f} s")
    print(f"warm/runc: {warm / runc:.1f} (target <= 10)")
    print(f"idle sandbox PSS (QEMU + shim): cold {cold_pss:.1f} MiB, clone {clone_pss[0]:.1f} MiB")
    print(f"clone/cold PSS: {clone_pss[0] / cold_pss:.2f} (target <= 0.40)")
    print(f"idle sandbox PSS (QEMU + shim) from the pool: {pool_pss:.1f} MiB")
    print(f"{args.idle} idle clones at once: {sum(clone_pss):.1f} MiB PSS in all")
    print(f"{args.parallel} at once, pool: {pool_ok}/{args.parallel} answered, "
          f"slowest {pool_slowest:.1f} s")  # fmt: skip
    print(f"{args.parallel} at once, warm: {warm_ok}/{args.parallel} answered, "
          f"slowest {warm_slowest:.1f} s")  # fmt: skip
    print(f"{args.parallel} at once, cold: {cold_ok}/{args.parallel} answered, "
          f"slowest {cold_slowest:.1f} s")  # fmt: skip
    print(f"warm/cold: {warm / cold:.2f}")
    print(f"pool/runc: {pool / runc:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
