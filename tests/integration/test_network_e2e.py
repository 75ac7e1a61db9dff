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

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.net_throughput import HUSK, Pod, import_busybox, pod_netns
from tests.integration.conftest import CTR, Containerd
from tests.integration.test_network import links, veth_state

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, containerd)"),
    pytest.mark.skipif(shutil.which("containerd") is None, reason="needs containerd"),
]

PORT = 5002
START_TIMEOUT = 240.0  # a TCG boot is slow


@pytest.fixture(scope="module")
def ctr_image() -> Iterator[tuple[list[str], str]]:
    """A containerd of its own (the suite's ``Containerd``) with husk on a temp state dir."""
    state_root = Path(tempfile.mkdtemp(prefix="husk-net-", dir="/tmp"))
    config = state_root.with_name(state_root.name + ".toml")
    config.write_text(f'[runtime]\nstate_dir = "{state_root}"\nhypervisor = "qemu"\n')
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {"HUSK_CONFIG": str(config)})
    try:
        image = import_busybox([CTR, "--address", daemon.address], base)
        yield [CTR, "--address", daemon.address], image
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


def test_container_on_the_pod_network(ctr_image: tuple[list[str], str], pod: Pod) -> None:
    ctr, image = ctr_image
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


def test_without_a_netns_only_loopback(ctr_image: tuple[list[str], str]) -> None:
    ctr, image = ctr_image
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
