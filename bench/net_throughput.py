"""TCP throughput into a container: husk's tap path (VM) against runc, same run.

    python3 -m bench.net_throughput [--mib 64] [--rounds 3] [--json]

One pod network namespace is made the way a CNI plugin makes it (a veth with
one end inside, addressed, default route via the host end). A private
containerd (temp root and socket) runs a busybox receiver in that namespace,
``nc -ll -p 5001 -e dd of=/dev/null``, first under runc (the baseline: the
veth straight into the container's stack), then under husk (veth → tc
redirect → tap → QEMU virtio-net, TCG here → the guest's stack). The host end
sends ``--mib`` MiB per connection and waits for the receiver to close; the
best of ``--rounds`` connections counts for each. The ratio printed is
husk/runc. Both runs take turns, not overlap: husk's redirect takes every
frame off the veth while its sandbox lives.

Needs root, containerd, runc, ``containerd-shim-husk-v2`` next to this Python
and a built guest image. Exits 2 with the reason when a runtime cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.integration.containerd import CTR, Containerd

PORT = 5001
NAMESPACE = "husk-bench"
RUNC = "io.containerd.runc.v2"
HUSK = "io.containerd.husk.v2"
READY_TIMEOUT = 180.0  # a TCG boot is slow
CHUNK = 1 << 20


@dataclass(frozen=True)
class Pod:
    """The namespace a CNI plugin would have made: ``eth0`` inside, ``host`` outside."""

    name: str
    path: str
    host: str
    host_ip: str
    pod_ip: str


@dataclass
class Result:
    """Best-of-rounds throughput of one runtime, MiB/s."""

    runtime: str
    mib: int
    rounds: list[float]

    @property
    def best(self) -> float:
        return max(self.rounds) if self.rounds else 0.0


class CannotRun(Exception):
    """A runtime could not start the receiver; the message says why."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def pod_netns() -> Iterator[Pod]:
    """A CNI-style namespace, removed (with its veth) on the way out."""
    tag = uuid.uuid4().hex[:6]
    name, host = f"husk-bench-{tag}", f"hb{tag}"
    subnet = int(tag[:2], 16)  # another run at the same time most likely has another
    host_ip, pod_ip = f"10.214.{subnet}.1", f"10.214.{subnet}.2"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("addr", "add", f"{host_ip}/24", "dev", host)
        _ip("link", "set", host, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "route", "add", "default", "via", host_ip)
        yield Pod(name, f"/var/run/netns/{name}", host, host_ip, pod_ip)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host], capture_output=True, check=False)


@contextmanager
def private_containerd(workdir: Path) -> Iterator[list[str]]:
    """A containerd of our own; yields the ``ctr`` command prefix that reaches it."""
    base = workdir / "containerd"
    base.mkdir()
    daemon = Containerd(base, {})
    try:
        yield [CTR, "--address", daemon.address, "--namespace", NAMESPACE]
    finally:
        daemon.stop()


def import_busybox(ctr: list[str], workdir: Path) -> str:
    """Import the local busybox image; its reference."""
    from shim.cli import local_images

    tarball = local_images.build_busybox(workdir / "busybox.tar")
    subprocess.run([*ctr, "image", "import", str(tarball)], check=True, capture_output=True)
    return local_images.BUSYBOX_REFERENCE


def _wait_listening(pod: Pod, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((pod.pod_ip, PORT), timeout=2) as s:
                s.shutdown(socket.SHUT_WR)
                s.recv(1)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise CannotRun(f"no receiver on {pod.pod_ip}:{PORT} after {timeout:g} s") from None
            time.sleep(0.2)


def transfer(pod: Pod, mib: int) -> float:
    """Send ``mib`` MiB to the receiver and wait for it to close; MiB/s."""
    data = b"\0" * CHUNK
    with socket.create_connection((pod.pod_ip, PORT), timeout=60) as s:
        started = time.monotonic()
        for _ in range(mib):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        return mib / (time.monotonic() - started)


@contextmanager
def receiver(ctr: list[str], image: str, runtime: str, pod: Pod) -> Iterator[None]:
    """A container running the TCP sink in the pod's namespace, removed afterwards."""
    cid = f"bench-{runtime.split('.')[-2]}-{uuid.uuid4().hex[:6]}"
    run = [*ctr, "run", "-d", "--runtime", runtime, "--with-ns", f"network:{pod.path}"]
    cmd = [image, cid, "nc", "-ll", "-p", str(PORT), "-e", "dd", "of=/dev/null", "bs=65536"]
    proc = subprocess.run([*run, *cmd], capture_output=True, text=True, check=False)
    try:
        if proc.returncode != 0:
            raise CannotRun(f"{runtime}: ctr run failed: {proc.stderr.strip()}")
        _wait_listening(pod, READY_TIMEOUT)
        yield
    finally:
        subprocess.run([*ctr, "task", "kill", "-s", "KILL", cid], capture_output=True, check=False)
        time.sleep(0.5)
        subprocess.run([*ctr, "task", "rm", "-f", cid], capture_output=True, check=False)
        subprocess.run([*ctr, "container", "rm", cid], capture_output=True, check=False)


def measure(ctr: list[str], image: str, runtime: str, pod: Pod, mib: int, rounds: int) -> Result:
    """Best-of-``rounds`` transfers into a receiver under ``runtime``."""
    result = Result(runtime, mib, [])
    with receiver(ctr, image, runtime, pod):
        for _ in range(rounds):
            result.rounds.append(transfer(pod, mib))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run both, print MiB/s and the husk/runc ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per runtime")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("net_throughput: needs root (netns, containerd)", file=sys.stderr)
        return 2
    for tool in ("containerd", "ctr", "runc", "ip"):
        if shutil.which(tool) is None:
            print(f"net_throughput: {tool} not found", file=sys.stderr)
            return 2
    results: list[Result] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="husk-bench-") as tmp,
            pod_netns() as pod,
            private_containerd(Path(tmp)) as ctr,
        ):
            image = import_busybox(ctr, Path(tmp))
            for runtime in (RUNC, HUSK):
                results.append(measure(ctr, image, runtime, pod, args.mib, args.rounds))
    except CannotRun as e:
        done = ", ".join(f"{r.runtime} {r.best:.1f} MiB/s" for r in results)
        print(f"net_throughput: could not run: {e}" + (f" (measured: {done})" if done else ""))
        return 2
    runc, husk = results
    ratio = husk.best / runc.best if runc.best else 0.0
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results], "ratio": ratio}))
    else:
        for r in results:
            print(f"{r.runtime:24} {r.best:10.1f} MiB/s  (rounds: {r.rounds})")
        print(f"husk/runc ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
