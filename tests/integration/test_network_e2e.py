"""A husk container on a CNI-style pod network, end to end through containerd.

``ctr run --with-ns network:<netns> --runtime io.containerd.husk.v2``: inside
the container ``ip addr`` shows the veth's address and MAC, ``ping`` reaches
the host end, and a TCP server in the container answers a client on the host
end; after the container is deleted the namespace holds no tap or filter and
the veth is as it was. Without a network namespace path the container has
only loopback.

Skips (saying why) only while the hypervisor cannot start a sandbox at all;
a sandbox that starts without its network is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.net_throughput import HUSK, Pod, import_busybox, pod_netns
from tests.integration.containerd import CTR, Containerd, sandbox_dirs
from tests.integration.test_network import in_pod, links, veth_state

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, containerd)"),
    pytest.mark.skipif(shutil.which("containerd") is None, reason="needs containerd"),
]

PORT = 5002
START_TIMEOUT = 240.0  # a TCG boot is slow


@pytest.fixture(scope="module")
def ctr_image() -> Iterator[tuple[list[str], str, Path]]:
    """A containerd of its own (the suite's ``Containerd``) with husk on a temp state dir."""
    state_root = Path(tempfile.mkdtemp(prefix="husk-net-", dir="/tmp"))
    config = state_root.with_name(state_root.name + ".toml")
    config.write_text(f'[runtime]\nstate_dir = "{state_root}"\nhypervisor = "qemu"\n')
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {"HUSK_CONFIG": str(config)})
    try:
        image = import_busybox([CTR, "--address", daemon.address], base)
        yield [CTR, "--address", daemon.address], image, state_root
    finally:
        daemon.stop()
        config.unlink(missing_ok=True)
        shutil.rmtree(state_root, ignore_errors=True)


@pytest.fixture
def pod() -> Iterator[Pod]:
    with pod_netns() as p:
        yield p


def _run(ctr: list[str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ctr, *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def _start(ctr: list[str], image: str, cid: str, *argv: str, netns: str | None) -> None:
    ns = ["--with-ns", f"network:{netns}"] if netns else []
    proc = _run(ctr, "run", "-d", "--runtime", HUSK, *ns, image, cid, *argv, timeout=START_TIMEOUT)
    if proc.returncode != 0:
        if "does not support" in proc.stderr:
            pytest.skip(f"husk cannot start a sandbox here yet: {proc.stderr.strip()}")
        raise AssertionError(f"ctr run failed: {proc.stderr.strip()}")


def _exec(ctr: list[str], cid: str, *argv: str) -> str:
    proc = _run(ctr, "task", "exec", "--exec-id", uuid.uuid4().hex[:8], cid, *argv)
    assert proc.returncode == 0, f"{argv} failed: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _remove(ctr: list[str], cid: str) -> None:
    _run(ctr, "task", "kill", "-s", "KILL", cid)
    deadline = time.monotonic() + 30
    while _run(ctr, "task", "rm", cid).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    _run(ctr, "task", "rm", "-f", cid)
    _run(ctr, "container", "rm", cid)


def test_container_on_the_pod_network(ctr_image: tuple[list[str], str, Path], pod: Pod) -> None:
    ctr, image, _ = ctr_image
    before = veth_state(pod)
    cid = f"net-{uuid.uuid4().hex[:6]}"
    server = ["nc", "-ll", "-p", str(PORT), "-e", "echo", "hello-from-husk"]
    _start(ctr, image, cid, *server, netns=pod.path)
    try:
        addr = _exec(ctr, cid, "ip", "addr")
        assert f"inet {pod.pod_ip}/24" in addr, addr
        assert before["mac"] in addr, addr
        _exec(ctr, cid, "ping", "-c", "1", "-W", "10", pod.host_ip)
        with socket.create_connection((pod.pod_ip, PORT), timeout=30) as s:
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        assert got.strip() == b"hello-from-husk"
    finally:
        _remove(ctr, cid)
    assert links(pod) == {"lo", "eth0"}  # no tap left
    assert veth_state(pod) == before  # no qdisc or filter; address, MAC, MTU, state kept


def test_without_a_netns_only_loopback(ctr_image: tuple[list[str], str, Path]) -> None:
    ctr, image, _ = ctr_image
    cid = f"lo-{uuid.uuid4().hex[:6]}"
    _start(ctr, image, cid, "sleep", "600", netns=None)
    try:
        names = {
            line.split(":")[1].strip().split("@")[0]
            for line in _exec(ctr, cid, "ip", "-o", "link").splitlines()
            if ":" in line
        }
        assert names == {"lo"}, names
    finally:
        _remove(ctr, cid)


def _fails_leaving_nothing(ctr: list[str], image: str, state_root: Path, netns: str) -> str:
    """``ctr run`` on ``netns`` must fail; its one-line error, once nothing is left."""
    cid = f"bad-{uuid.uuid4().hex[:6]}"
    proc = _run(
        ctr,
        "run",
        "-d",
        "--runtime",
        HUSK,
        "--with-ns",
        f"network:{netns}",
        image,
        cid,
        "true",
        timeout=START_TIMEOUT,
    )
    _run(ctr, "container", "rm", cid)
    assert proc.returncode != 0, proc.stdout
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1, error
    deadline = time.monotonic() + 20
    while sandbox_dirs(state_root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sandbox_dirs(state_root) == []  # no state dir
    qemus = subprocess.run(["pgrep", "-f", str(state_root)], capture_output=True, text=True)
    assert not qemus.stdout.strip(), qemus.stdout  # no VM
    return error


def test_a_missing_netns_fails_the_start(ctr_image: tuple[list[str], str, Path]) -> None:
    ctr, image, state_root = ctr_image
    netns = f"/var/run/netns/husk-missing-{uuid.uuid4().hex[:6]}"
    error = _fails_leaving_nothing(ctr, image, state_root, netns)
    assert f"network namespace {netns} does not exist" in error, error


def test_a_network_setup_failure_leaves_nothing(
    ctr_image: tuple[list[str], str, Path], pod: Pod
) -> None:
    ctr, image, state_root = ctr_image
    # an ingress qdisc of someone else's: husk must refuse, not redirect around it
    in_pod(pod, lambda ipr: ipr.tc("add", "ingress", ipr.link_lookup(ifname="eth0")[0]))
    before = veth_state(pod)
    error = _fails_leaving_nothing(ctr, image, state_root, pod.path)
    assert "eth0" in error and pod.path in error and "ingress qdisc" in error, error
    assert links(pod) == {"lo", "eth0"}  # no tap
    assert veth_state(pod) == before  # the foreign qdisc is still there, nothing of ours


def test_a_killed_shim_leaves_no_tap_or_redirect(
    ctr_image: tuple[list[str], str, Path], pod: Pod
) -> None:
    ctr, image, state_root = ctr_image
    before = veth_state(pod)
    cid = f"kill-{uuid.uuid4().hex[:6]}"
    _start(ctr, image, cid, "sleep", "600", netns=pod.path)
    try:
        assert "tap0_husk" in links(pod)
        record = json.loads((state_root / cid / "sandbox.json").read_text())
        kinds = {(r["kind"], r["name"]) for r in record["resources"]}
        assert {("net-tap", "tap0_husk"), ("net-ingress", "eth0")} <= kinds, kinds
        os.kill(record["shim_pid"], signal.SIGKILL)
    finally:
        _remove(ctr, cid)  # containerd runs the shim's `delete`, which reclaims the record
    assert links(pod) == {"lo", "eth0"}
    assert veth_state(pod) == before
    assert not (state_root / cid).exists()
