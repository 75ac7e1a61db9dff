"""Pod start through containerd's CRI plugin, the way the kubelet starts a pod.

    python -m bench.pod_start [--rounds 5] [--containerd 2.4] [--handlers runc,husk,...]
                              [--burst 10]

One containerd with CRI and a CNI bridge (``tests.kubelet.CriContainerd``;
the system's, or ``--containerd LINE`` of the test matrix) and its runtime
handlers: ``runc``, ``husk`` (cold boots), ``husk-template`` (clones of a
VM template, made once before the rounds) and ``husk-pool`` (VMs of a VM
pool, ``[factory] vm_cache_number``, whose daemon is started before the
rounds; the pool is full again before each of its rounds, untimed: a
pool's promise is a ready VM, and how fast it refills is printed apart);
on containerd 2.x also ``husk-vm``, ``husk-template-vm`` and ``husk-pool-vm``,
the same with ``sandboxer = "shim"`` (the shim starts the pod's VM through
containerd's sandbox API, no pause container). ``--handlers`` picks which run
(default: all the containerd has).
A round is what the kubelet does to start a one-container pod:
``RunPodSandbox`` + ``CreateContainer`` + ``StartContainer`` (timed), then stop
and remove (not timed). Rounds alternate between handlers so a machine that
slows down mid-run slows all alike. Prints each handler's median of
``--rounds`` and, last, the ratios against runc and of each shim-sandboxer
handler against its pause-container twin.

``--burst N`` then starts N pods at once on ``husk-template`` and on
``husk-pool`` (its pool then keeps N VMs, all ready before the burst) and
prints each burst's slowest pod against the template clone's median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import mounts
from shim.sandbox import cleanup
from tests.integration import containerd_versions
from tests.integration.vm_pool import husk, pool_status, wait_full
from tests.kubelet.client import CriClient
from tests.kubelet.cri_containerd import CriContainerd, husk_handler
from tests.kubelet.pods import Pod, container_config, pod_config, remove_pod, start_container

HANDLERS = ("runc", "husk", "husk-template", "husk-pool")
#: how long a pool may take to be full again
POOL_FILL_TIMEOUT = 600.0
#: containerd 2.x only: the same configurations with the shim as the pod's sandboxer
SHIM_SANDBOXER = {
    "husk-vm": "husk",
    "husk-template-vm": "husk-template",
    "husk-pool-vm": "husk-pool",
}


def start_pod(client: CriClient, handler: str, name: str) -> tuple[float, Pod]:
    """Seconds to run a pod and start one container in it; returns (seconds, pod)."""
    config = pod_config(name)
    started = time.monotonic()
    pod = Pod(client.run_pod_sandbox(config, handler), config)
    start_container(client, pod, container_config("main", ["sleep", "3600"]))
    return time.monotonic() - started, pod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pod_start")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--containerd", default="", help="a release of the test matrix, e.g. 2.4")
    parser.add_argument("--handlers", default="", help="comma-separated; default: all")
    parser.add_argument("--burst", type=int, default=0, help="then start this many pods at once")
    args = parser.parse_args(argv)
    binaries = (
        containerd_versions.provide(args.containerd)
        if args.containerd
        else containerd_versions.system()
    )
    known = HANDLERS + (tuple(SHIM_SANDBOXER) if binaries.major >= 2 else ())
    handlers = tuple(h for h in args.handlers.split(",") if h) or known
    unknown = [h for h in handlers if h not in known]
    if unknown:
        parser.error(f"containerd {binaries.version} has no handler {', '.join(unknown)}")
    print(f"containerd {binaries.version}: {', '.join(handlers)}", flush=True)

    # short: CRI ids are 64 characters and a VM's sockets live under <root>/<id>/
    base = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))
    cold, template = base / "husk.toml", base / "husk-template.toml"
    pooled = base / "husk-pool.toml"
    cold.write_text(f'[runtime]\nstate_dir = "{base / "c"}"\n')
    factory = f'[factory]\nenable_template = true\ntemplate_path = "{base / "template"}"\n'
    template.write_text(f'[runtime]\nstate_dir = "{base / "t"}"\n{factory}')
    pooled.write_text(
        f'[runtime]\nstate_dir = "{base / "p"}"\n{factory}'
        f'vm_cache_number = {max(1, args.burst)}\nvm_cache_endpoint = "{base / "pool.sock"}"\n'
    )
    (base / "ctd").mkdir()
    runtimes = {
        "husk": husk_handler(cold),
        "husk-template": husk_handler(template),
        "husk-pool": husk_handler(pooled),
    }
    if binaries.major >= 2:
        runtimes |= {
            "husk-vm": husk_handler(cold, "shim"),
            "husk-template-vm": husk_handler(template, "shim"),
            "husk-pool-vm": husk_handler(pooled, "shim"),
        }
    daemon = CriContainerd(
        base / "ctd", runtimes=runtimes, env={"HUSK_CONFIG": ""}, binaries=binaries
    )
    try:
        assert daemon.cri is not None
        client = daemon.cri
        templated = [h for h in handlers if "template" in h]
        if templated:
            # the first templated pod makes the template; not a round
            seconds, pod = start_pod(client, templated[0], "warmup")
            remove_pod(client, pod)
            print(f"template made (first {templated[0]} pod): {seconds:.2f} s", flush=True)
        if any(h.startswith("husk-pool") for h in handlers) or args.burst:
            husk(pooled, "factory", "init")
            print(f"pool full: {pool_full(pooled):.2f} s", flush=True)
        times: dict[str, list[float]] = {h: [] for h in handlers}
        for round_ in range(args.rounds):
            for handler in handlers:
                if handler.startswith("husk-pool"):
                    pool_full(pooled)
                seconds, pod = start_pod(client, handler, f"{handler}-{round_}")
                remove_pod(client, pod)
                times[handler].append(seconds)
                print(f"round {round_ + 1} {handler}: {seconds:.3f} s", flush=True)
        medians = {h: statistics.median(t) for h, t in times.items()}
        for handler in handlers:
            print(f"{handler} median: {medians[handler]:.3f} s")
        _ratios(medians)
        if "husk-pool" in handlers:
            status = pool_status(pooled) or {}
            print(
                f"pool refill: {status.get('refill_seconds_mean', 0.0):.2f} s mean, "
                f"{status.get('hits', 0)} hits, {status.get('misses', 0)} misses",
                flush=True,
            )
        if args.burst:
            _burst(client, args.burst, pooled, medians.get("husk-template"))
    except BaseException:
        # the shims log into containerd's log: keep it for whoever reads the failure
        kept = Path(tempfile.gettempdir()) / "pod_start-containerd.log"
        kept.write_text(daemon.log_text())
        print(f"containerd's log (shims included) kept in {kept}", flush=True)
        raise
    finally:
        husk(pooled, "factory", "destroy", check=False)
        daemon.stop()
        cleanup.kill_and_wait(cleanup.processes_naming(base / "template"))
        for point in mounts.mounts_under(base):
            mounts.unmount(point)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def pool_full(config: Path) -> float:
    """Wait until every VM of the pool is ready; the seconds it took."""
    started = time.monotonic()
    wait_full(config, POOL_FILL_TIMEOUT)
    return time.monotonic() - started


def _burst(client: CriClient, count: int, pooled: Path, clone_median: float | None) -> None:
    """``count`` pods at once, on ``husk-template`` then on a full ``husk-pool``."""
    for handler in ("husk-template", "husk-pool"):
        if handler == "husk-pool":
            pool_full(pooled)
        with ThreadPoolExecutor(count) as workers:
            started = [
                workers.submit(start_pod, client, handler, f"burst-{handler}-{i}")
                for i in range(count)
            ]
            results = [f.result() for f in started]
        for _, pod in results:
            remove_pod(client, pod)
        seconds = sorted(s for s, _ in results)
        print(
            f"burst of {count} {handler}: slowest {seconds[-1]:.3f} s, "
            f"median {statistics.median(seconds):.3f} s",
            flush=True,
        )
        if clone_median and handler == "husk-pool":
            print(
                f"burst husk-pool slowest / husk-template median: {seconds[-1] / clone_median:.2f}"
            )


def _ratios(medians: dict[str, float]) -> None:
    """Each husk handler against runc, and each shim-sandboxer one against its twin."""
    pairs = [(h, "runc") for h in medians if h != "runc"]
    pairs += [(vm, twin) for vm, twin in SHIM_SANDBOXER.items()]
    if "husk" in medians and "husk-template" in medians:
        pairs.append(("husk-template", "husk"))
    for handler, baseline in pairs:
        if handler in medians and baseline in medians:
            print(f"{handler}/{baseline}: {medians[handler] / medians[baseline]:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
