"""Idle pod memory: the PSS of everything one pod keeps on the host.

    python -m bench.memory [--rounds 3] [--clones 4] [--settle 5] [--handlers runc,husk,...]

One containerd with CRI (``tests.kubelet.CriContainerd``, as ``bench.pod_start``)
and the handlers ``runc``, ``husk`` (a cold VM per pod) and ``husk-template``
(clones of a VM template, made once before the rounds). A round starts a pod
with one busybox ``sleep``, lets it settle (``--settle`` seconds: the guest's
free page reporting runs every 2 s), and adds up the proportional set size
(``Pss`` of ``/proc/<pid>/smaps_rollup``) of the pod's host processes: its
shim and every process below it (for husk: QEMU; for runc: pause and
``sleep``). PSS splits a page shared by n processes n ways, so clones that
share their template's RAM are charged their share of it, and the sum over
several pods is what they cost together. Prints each handler's median of
``--rounds``, then ``--clones`` template pods running at once (their total and
per pod), the ratios against runc, and last
``idle pod PSS: cold X MiB, clone Y MiB``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from common import mounts
from shim.resources import pss_bytes
from shim.sandbox import cleanup
from tests.integration import containerd_versions
from tests.kubelet.client import CriClient
from tests.kubelet.cri_containerd import CriContainerd, husk_handler
from tests.kubelet.pods import Pod, container_config, pod_config, remove_pod, start_container

HANDLERS = ("runc", "husk", "husk-template")
MiB = 1024 * 1024


def _processes(proc: Path) -> Iterable[tuple[int, int, bytes]]:
    """(pid, parent pid, cmdline) of every process."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        yield int(entry.name), int(stat.rpartition(")")[2].split()[1]), cmdline


def pod_processes(sandbox_id: str, proc: Path = Path("/proc")) -> set[int]:
    """The pod's shim (its command line names the sandbox) and every process below it."""
    table = list(_processes(proc))
    key = sandbox_id.encode()
    found = {pid for pid, _, cmdline in table if key in cmdline and pid != os.getpid()}
    grew = True
    while grew:
        below = {pid for pid, ppid, _ in table if ppid in found} - found
        found |= below
        grew = bool(below)
    return found


def pod_pss(sandbox_id: str, breakdown: bool = False) -> int:
    """The PSS of all the pod's host processes, summed (each printed with ``breakdown``)."""
    total = 0
    for pid in sorted(pod_processes(sandbox_id)):
        pss = pss_bytes(pid)
        total += pss
        if breakdown:
            print(f"  pid {pid} {_comm(pid)}: {_mib(pss)}")
    return total


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def start_idle_pod(client: CriClient, handler: str, name: str) -> Pod:
    """A pod with one busybox ``sleep``, running."""
    config = pod_config(name)
    pod = Pod(client.run_pod_sandbox(config, handler), config)
    start_container(client, pod, container_config("main", ["sleep", "3600"]))
    return pod


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clones", type=int, default=4, help="template pods run together")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    parser.add_argument("--handlers", default="", help="comma-separated; default: all")
    parser.add_argument("--breakdown", action="store_true", help="print each process's PSS")
    args = parser.parse_args(argv)
    handlers = tuple(h for h in args.handlers.split(",") if h) or HANDLERS
    unknown = [h for h in handlers if h not in HANDLERS]
    if unknown:
        parser.error(f"no handler {', '.join(unknown)}: use {', '.join(HANDLERS)}")
    binaries = containerd_versions.system()
    print(f"containerd {binaries.version}: {', '.join(handlers)}", flush=True)

    # short: CRI ids are 64 characters and a VM's sockets live under <root>/<id>/
    base = Path(tempfile.mkdtemp(prefix="m", dir="/tmp"))
    cold, template = base / "husk.toml", base / "husk-template.toml"
    cold.write_text(f'[runtime]\nstate_dir = "{base / "c"}"\n')
    template.write_text(
        f'[runtime]\nstate_dir = "{base / "t"}"\n'
        f'[factory]\nenable_template = true\ntemplate_path = "{base / "template"}"\n'
    )
    (base / "ctd").mkdir()
    runtimes = {"husk": husk_handler(cold), "husk-template": husk_handler(template)}
    daemon = CriContainerd(
        base / "ctd", runtimes=runtimes, env={"HUSK_CONFIG": ""}, binaries=binaries
    )
    try:
        assert daemon.cri is not None
        client = daemon.cri
        if "husk-template" in handlers:
            remove_pod(client, start_idle_pod(client, "husk-template", "warmup"))
            print("template made (first husk-template pod)", flush=True)
        sizes: dict[str, list[int]] = {h: [] for h in handlers}
        for round_ in range(args.rounds):
            # alternating, so a machine that gets busier mid-run weighs on all alike
            for handler in handlers:
                pod = start_idle_pod(client, handler, f"{handler}-{round_}")
                time.sleep(args.settle)
                sizes[handler].append(pod_pss(pod.id, args.breakdown))
                remove_pod(client, pod)
                print(f"round {round_ + 1} {handler}: {_mib(sizes[handler][-1])}", flush=True)
        medians = {h: statistics.median(s) for h, s in sizes.items()}
        for handler in handlers:
            print(f"{handler} median PSS: {_mib(medians[handler])}")
        if "husk-template" in handlers and args.clones > 0:
            pods = [
                start_idle_pod(client, "husk-template", f"clone-{n}") for n in range(args.clones)
            ]
            time.sleep(args.settle)
            total = sum(pod_pss(pod.id) for pod in pods)
            for pod in pods:
                remove_pod(client, pod)
            each = _mib(total / args.clones)
            print(f"{args.clones} clones together: {_mib(total)}, {each} per pod")
        if "runc" in medians:
            for handler in handlers:
                if handler != "runc" and medians["runc"]:
                    print(f"{handler}/runc: {medians[handler] / medians['runc']:.1f}")
        cold_pss = _mib(medians["husk"]) if "husk" in medians else "-"
        clone_pss = _mib(medians["husk-template"]) if "husk-template" in medians else "-"
        print(f"idle pod PSS: cold {cold_pss}, clone {clone_pss}")
    except BaseException:
        kept = Path(tempfile.gettempdir()) / "memory-containerd.log"
        kept.write_text(daemon.log_text())
        print(f"containerd's log (shims included) kept in {kept}", flush=True)
        raise
    finally:
        daemon.stop()
        cleanup.kill_and_wait(cleanup.processes_naming(base / "template"))
        for point in mounts.mounts_under(base):
            mounts.unmount(point)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
