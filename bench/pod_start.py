"""Pod start through containerd's CRI plugin, the way the kubelet starts a pod.

    python -m bench.pod_start [--rounds 5]

One containerd with CRI and a CNI bridge (``tests.kubelet.CriContainerd``)
and three runtime handlers: ``runc``, ``husk`` (cold boots) and
``husk-template`` (clones of a VM template, made once before the rounds).
A round is what the kubelet does to start a one-container pod:
``RunPodSandbox`` + ``CreateContainer`` + ``StartContainer`` (timed), then stop
and remove (not timed). Rounds alternate between handlers so a machine that
slows down mid-run slows all alike. Prints each handler's median of
``--rounds`` and, last, the ratios against runc.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import mounts
from shim.sandbox import cleanup
from tests.kubelet.client import CriClient
from tests.kubelet.cri_containerd import CriContainerd, husk_handler
from tests.kubelet.pods import Pod, container_config, pod_config, remove_pod, start_container

HANDLERS = ("runc", "husk", "husk-template")


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
    args = parser.parse_args(argv)

    # short: CRI ids are 64 characters and a VM's sockets live under <root>/<id>/
    base = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))
    cold, template = base / "husk.toml", base / "husk-template.toml"
    cold.write_text(f'[runtime]\nstate_dir = "{base / "c"}"\n')
    template.write_text(
        f'[runtime]\nstate_dir = "{base / "t"}"\n'
        f'[factory]\nenable_template = true\ntemplate_path = "{base / "template"}"\n'
    )
    (base / "ctd").mkdir()
    daemon = CriContainerd(
        base / "ctd",
        runtimes={"husk": husk_handler(cold), "husk-template": husk_handler(template)},
        env={"HUSK_CONFIG": ""},
    )
    try:
        assert daemon.cri is not None
        client = daemon.cri
        # the first husk-template pod makes the template; not a round
        seconds, pod = start_pod(client, "husk-template", "warmup")
        remove_pod(client, pod)
        print(f"template made (first husk-template pod): {seconds:.2f} s", flush=True)
        times: dict[str, list[float]] = {h: [] for h in HANDLERS}
        for round_ in range(args.rounds):
            for handler in HANDLERS:
                seconds, pod = start_pod(client, handler, f"{handler}-{round_}")
                remove_pod(client, pod)
                times[handler].append(seconds)
                print(f"round {round_ + 1} {handler}: {seconds:.3f} s", flush=True)
        medians = {h: statistics.median(t) for h, t in times.items()}
        for handler in HANDLERS:
            print(f"{handler} median: {medians[handler]:.3f} s")
        print(f"husk/runc: {medians['husk'] / medians['runc']:.1f}")
        print(f"husk-template/runc: {medians['husk-template'] / medians['runc']:.1f}")
        print(f"husk-template/husk: {medians['husk-template'] / medians['husk']:.2f}")
    finally:
        daemon.stop()
        cleanup.kill_and_wait(cleanup.processes_naming(base / "template"))
        for point in mounts.mounts_under(base):
            mounts.unmount(point)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
