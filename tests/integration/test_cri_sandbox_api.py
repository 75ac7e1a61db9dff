"""containerd 2.4's CRI with ``sandboxer = "shim"``: the pod's VM starts with no pause container.

One CRI containerd 2.4 (``CriContainerd`` on the matrix's 2.4 binaries) with
the ``husk-vm`` handler, as ``husk containerd-config`` prints it for 2.x: the
shim is the pod's sandboxer (containerd's Sandbox API: CreateSandbox,
StartSandbox, ...), and the pod's containers run in its VM through the task
API on the same shim. Its pods are clones of the session's VM template (the
sandbox API changes what starts the VM, not how it boots). CNI runs on the
host as for any pod; the VM carries the pod's network. A second handler,
``husk-vm-pool``, is the same with a VM pool (``[factory] vm_cache_number``):
its pod's VM is a pool VM that the shim took over before StartSandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.sandbox import cleanup
from tests.integration.containerd import sandbox_dirs
from tests.integration.containerd_versions import ContainerdBinaries
from tests.integration.vm_pool import running_pool, wait_full
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.client import CriClient, GRPCError
from tests.kubelet.cri_containerd import K8S_NAMESPACE, CriContainerd, husk_handler
from tests.kubelet.pods import (
    Pod,
    container_config,
    http_get,
    pod_config,
    remove_container,
    remove_pod,
    skip_reason,
    start_container,
)

HANDLER = "husk-vm"
POOL_HANDLER = "husk-vm-pool"


def _skip_reason() -> str | None:
    if not os.path.exists("/var/lib/husk/images/initrd.img"):
        return "no guest image: run `husk image build`"
    return skip_reason()


# containerd 2.3+ only: the sandbox API with `sandboxer = "shim"`; the matrix's 2.4
pytestmark = [pytest.mark.integration, pytest.mark.containerd_lines("2.4")]
_REASON = _skip_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="module")
def root(shared_template: str) -> Iterator[Path]:
    # short: CRI ids are 64 characters and a VM's sockets live under <root>/<id>/
    base = Path(tempfile.mkdtemp(prefix="hs", dir="/tmp"))
    yield base / "s"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cri_ctd(
    root: Path, shared_template: str, containerd_binaries: ContainerdBinaries
) -> Iterator[CriContainerd]:
    config = root.parent / "husk-vm.toml"
    config.write_text(f'[runtime]\nstate_dir = "{root}"\n{shared_template}')
    pooled = _pool_config(root)
    pooled.write_text(
        f'[runtime]\nstate_dir = "{root.parent / "p"}"\n{shared_template}'
        f'vm_cache_number = 1\nvm_cache_endpoint = "{root.parent / "pool.sock"}"\n'
    )
    daemon = CriContainerd(
        Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")),
        runtimes={
            HANDLER: husk_handler(config, "shim"),
            POOL_HANDLER: husk_handler(pooled, "shim"),
        },
        env={"HUSK_CONFIG": ""},
        binaries=containerd_binaries,
    )
    yield daemon
    daemon.stop()


def _pool_config(root: Path) -> Path:
    return root.parent / "husk-vm-pool.toml"


@pytest.fixture(scope="module")
def client(cri_ctd: CriContainerd) -> CriClient:
    assert cri_ctd.cri is not None
    return cri_ctd.cri


def _run_pod(
    cri_ctd: CriContainerd,
    client: CriClient,
    name: str,
    annotations: dict[str, str] | None = None,
) -> Pod:
    config = pod_config(name, log_directory=cri_ctd.base / "pods" / name, annotations=annotations)
    return Pod(client.run_pod_sandbox(config, HANDLER), config)


def _netns_files(cri_ctd: CriContainerd) -> set[Path]:
    """The pods' network namespaces CRI has made (under its state dir)."""
    return {p for p in cri_ctd.state.rglob("cni-*") if p.parent.name == "netns"}


def _vmms(root: Path, pod_id: str) -> list[int]:
    """The QEMU processes of a sandbox (they name its state dir)."""
    found = []
    for pid in cleanup.processes_naming(root / pod_id):
        try:
            if "qemu" in Path(f"/proc/{pid}/comm").read_text():
                found.append(pid)
        except OSError:
            continue
    return found


def _shims(pod_id: str) -> list[int]:
    """The husk shims serving a pod (their command line names it: ``-id <pod id>``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            any(a.endswith(b"containerd-shim-husk-v2") for a in args[:2])
            and pod_id.encode() in args
        ):
            found.append(int(entry.name))
    return found


def _mount_points(*needles: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if any(n in line for n in needles)]


def _leftovers(root: Path, pod_id: str, netns: set[Path]) -> list[str]:
    found = [f"state dir {d}" for d in sandbox_dirs(root) if d.name == pod_id]
    found += [f"process {pid}" for pid in cleanup.processes_naming(root / pod_id)]
    found += [f"shim {pid}" for pid in _shims(pod_id)]
    found += [f"mount {m}" for m in _mount_points(pod_id)]
    found += [f"netns {n}" for n in netns if n.exists()]
    return found


def _wait_gone(root: Path, pod_id: str, netns: set[Path], timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while _leftovers(root, pod_id, netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _leftovers(root, pod_id, netns)


def _out(client: CriClient, container_id: str, script: str) -> str:
    result = client.exec_sync(container_id, ["sh", "-c", script], timeout=60)
    assert result.exit_code == 0, result
    return result.stdout.decode()


@pytest.fixture(scope="module")
def pod(cri_ctd: CriContainerd, client: CriClient) -> Iterator[Pod]:
    pod = _run_pod(cri_ctd, client, "vm")
    yield pod
    remove_pod(client, pod)


@pytest.fixture(scope="module")
def sleepers(client: CriClient, pod: Pod) -> Iterator[list[str]]:
    ids = [
        start_container(client, pod, container_config(name, ["sleep", "3600"]))
        for name in ("one", "two")
    ]
    yield ids
    for container_id in ids:
        remove_container(client, container_id)


def test_the_pods_vm_runs_with_no_pause_container(
    cri_ctd: CriContainerd, client: CriClient, root: Path, pod: Pod, sleepers: list[str]
) -> None:
    assert client.pod_sandbox_status(pod.id).status.state == cri.SANDBOX_READY
    assert [d.name for d in sandbox_dirs(root)] == [pod.id]
    assert len(_vmms(root, pod.id)) == 1 and len(_shims(pod.id)) == 1
    # containerd has a task for each container and none for the pod itself
    tasks = cri_ctd.ctr("tasks", "ls", "-q", namespace=K8S_NAMESPACE).stdout.decode().split()
    assert sorted(tasks) == sorted(sleepers)
    containers = cri_ctd.ctr("containers", "ls", "-q", namespace=K8S_NAMESPACE)
    assert pod.id not in containers.stdout.decode().split()
    # nor does the VM: its sandbox holds the two containers only
    state = json.loads((root / pod.id / "sandbox.json").read_text())
    assert sorted(state["containers"]) == sorted(sleepers)


def test_the_pods_containers_share_the_vm_and_its_network(
    client: CriClient, root: Path, pod: Pod, sleepers: list[str]
) -> None:
    script = "cat /proc/sys/kernel/random/boot_id; hostname; ip -4 -o addr show dev eth0"
    first, second = (_out(client, c, script) for c in sleepers)
    assert first == second
    pod_ip = client.pod_sandbox_status(pod.id).status.network.ip
    assert pod_ip and f"inet {pod_ip}/" in first
    assert len(_vmms(root, pod.id)) == 1


def test_exec_sync_returns_stdout_stderr_and_exit_code(
    client: CriClient, sleepers: list[str]
) -> None:
    result = client.exec_sync(
        sleepers[0], ["sh", "-c", "echo hi; echo oops >&2; exit 3"], timeout=60
    )
    assert result == (3, b"hi\n", b"oops\n")


def test_a_server_in_the_pod_answers_the_host_at_the_pod_ip(
    client: CriClient, pod: Pod, sleepers: list[str]
) -> None:
    script = "mkdir /www && echo hello-from-vm > /www/index.html && exec httpd -f -p 8080 -h /www"
    httpd = start_container(client, pod, container_config("httpd", ["sh", "-c", script]))
    try:
        ip = client.pod_sandbox_status(pod.id).status.network.ip
        reply = http_get(ip, 8080, "/index.html")
        assert reply.startswith(b"HTTP/1.") and reply.endswith(b"hello-from-vm\n")
    finally:
        remove_container(client, httpd)


def test_the_pods_hostname_hosts_and_dns_reach_its_containers_read_only(
    cri_ctd: CriContainerd, client: CriClient
) -> None:
    config = pod_config("named", log_directory=cri_ctd.base / "pods" / "named")
    config.dns_config.servers.append("10.96.0.10")
    config.dns_config.searches.append("default.svc.cluster.local")
    config.dns_config.options.append("ndots:5")
    pod = Pod(client.run_pod_sandbox(config, HANDLER), config)
    try:
        container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
        assert _out(client, container, "cat /etc/hostname") == "named\n"
        assert _out(client, container, "cat /etc/resolv.conf") == (
            "search default.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        )
        assert "localhost" in _out(client, container, "cat /etc/hosts")
        written = client.exec_sync(container, ["sh", "-c", "echo x >> /etc/resolv.conf"], 60)
        assert written.exit_code != 0
    finally:
        remove_pod(client, pod)


def test_stop_and_remove_leave_no_vmm_shim_tap_mount_netns_or_state(
    cri_ctd: CriContainerd, client: CriClient, root: Path
) -> None:
    before = _netns_files(cri_ctd)
    pod = _run_pod(cri_ctd, client, "brief")
    netns = _netns_files(cri_ctd) - before
    container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
    assert netns and len(_vmms(root, pod.id)) == 1 and _mount_points(pod.id)

    client.stop_pod_sandbox(pod.id)
    assert client.pod_sandbox_status(pod.id).status.state == cri.SANDBOX_NOTREADY
    assert _vmms(root, pod.id) == []
    remove_container(client, container)
    client.remove_pod_sandbox(pod.id)

    assert _wait_gone(root, pod.id, netns) == []
    assert client.list_pod_sandbox(pod_id=pod.id) == []


def test_a_pod_annotation_the_config_does_not_enable_fails_in_one_line_and_leaves_nothing(
    cri_ctd: CriContainerd, client: CriClient, root: Path
) -> None:
    before = {p.id for p in client.list_pod_sandbox()}
    netns_before = _netns_files(cri_ctd)
    with pytest.raises(GRPCError) as failure:
        _run_pod(cri_ctd, client, "greedy", {"io.husk.config.hypervisor.default_vcpus": "2"})
    message = str(failure.value.message)
    assert 'add "default_vcpus" to enable_annotations' in message
    assert "\n" not in message.strip()
    assert {p.id for p in client.list_pod_sandbox()} <= before
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        {d.name for d in sandbox_dirs(root)} - before or _netns_files(cri_ctd) - netns_before
    ):
        time.sleep(0.2)
    assert {d.name for d in sandbox_dirs(root)} <= before
    assert _netns_files(cri_ctd) <= netns_before


def test_a_killed_vmm_makes_the_pod_notready_and_its_containers_exit(
    cri_ctd: CriContainerd, client: CriClient, root: Path
) -> None:
    before = _netns_files(cri_ctd)
    pod = _run_pod(cri_ctd, client, "doomed")
    netns = _netns_files(cri_ctd) - before
    container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
    (vmm,) = _vmms(root, pod.id)
    os.kill(vmm, 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pod_state = client.pod_sandbox_status(pod.id).status.state
        container_state = client.container_status(container).status.state
        if pod_state == cri.SANDBOX_NOTREADY and container_state == cri.CONTAINER_EXITED:
            break
        time.sleep(0.3)
    assert client.pod_sandbox_status(pod.id).status.state == cri.SANDBOX_NOTREADY
    status = client.container_status(container).status
    assert status.state == cri.CONTAINER_EXITED and status.exit_code == 137

    remove_pod(client, pod)
    assert _wait_gone(root, pod.id, netns) == []


# ---- husk-vm-pool: the pod's VM comes from the VM pool ----


@pytest.fixture(scope="module")
def pool(cri_ctd: CriContainerd, root: Path) -> Iterator[Path]:
    with running_pool(_pool_config(root)) as config:
        yield config


def test_a_pool_pods_vm_is_a_pool_vm_its_shim_took_over_with_no_pause_container(
    cri_ctd: CriContainerd, client: CriClient, root: Path, pool: Path
) -> None:
    wait_full(pool)
    before = _netns_files(cri_ctd)
    config = pod_config("pooled", log_directory=cri_ctd.base / "pods" / "pooled")
    pod = Pod(client.run_pod_sandbox(config, POOL_HANDLER), config)
    netns = _netns_files(cri_ctd) - before
    pool_root = root.parent / "p"
    try:
        container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
        out = _out(client, container, "hostname; ip -4 -o addr show dev eth0")
        pod_ip = client.pod_sandbox_status(pod.id).status.network.ip
        assert out.startswith("pooled\n") and f"inet {pod_ip}/" in out
        boots = [line for line in cri_ctd.log_text().splitlines() if f"sandbox {pod.id}: " in line]
        assert any("from the VM pool" in line for line in boots), boots
        state = json.loads((pool_root / pod.id / "sandbox.json").read_text())
        assert state["containers"] == [container]  # and no pause container
        (vmm,) = [r["pid"] for r in state["resources"] if r["kind"] == "process"]
    finally:
        remove_pod(client, pod)
    assert _wait_gone(pool_root, pod.id, netns) == []
    status = Path(f"/proc/{vmm}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()
