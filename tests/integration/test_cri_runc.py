"""The kubelet's path through containerd's CRI plugin, with plain runc pods.

This proves the test harness of ``tests/kubelet`` before husk is put behind
it: a containerd with CRI, a CNI bridge and a local pause image on a temp dir
(``CriContainerd``), driven over CRI v1 gRPC (``CriClient``), plus containerd's
Tasks API (``TasksClient``) on a plain containerd for what ``ctr`` 1.6 cannot
do. One CRI containerd and one plain containerd serve the whole module.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.cli import local_images
from tests.integration.containerd import Containerd
from tests.integration.containerd_versions import ContainerdBinaries
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.client import CriClient, TasksClient
from tests.kubelet.cri_containerd import PAUSE_IMAGE, CriContainerd
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

MiB = 1 << 20


pytestmark = [pytest.mark.integration]
_REASON = skip_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="module")
def cri_ctd(containerd_binaries: ContainerdBinaries) -> Iterator[CriContainerd]:
    base = Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp"))
    daemon = CriContainerd(base, binaries=containerd_binaries)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def client(cri_ctd: CriContainerd) -> CriClient:
    assert cri_ctd.cri is not None
    return cri_ctd.cri


def _run_pod(cri_ctd: CriContainerd, client: CriClient, name: str) -> Pod:
    config = pod_config(name, log_directory=cri_ctd.base / "pods" / name)
    return Pod(client.run_pod_sandbox(config, "runc"), config)


@pytest.fixture(scope="module")
def pod(cri_ctd: CriContainerd, client: CriClient) -> Iterator[Pod]:
    pod = _run_pod(cri_ctd, client, "web")
    yield pod
    remove_pod(client, pod)


@pytest.fixture(scope="module")
def sleeper(client: CriClient, pod: Pod) -> Iterator[str]:
    container_id = start_container(client, pod, container_config("sleeper", ["sleep", "3600"]))
    yield container_id
    remove_container(client, container_id)


def _pid(client: CriClient, container_id: str) -> int:
    info = json.loads(client.container_status(container_id, verbose=True).info["info"])
    return int(info["pid"])


def _host_memory_limit(pid: int) -> int:
    """memory.limit_in_bytes of the cgroup v1 memory cgroup ``pid`` is in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            limit = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
            return int(limit.read_text())
    raise AssertionError(f"pid {pid} is in no cgroup v1 memory cgroup")


def _mount_lines(*needles: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if any(n in line for n in needles)]


# ---- images and runtime ----


def test_cri_sees_the_local_pause_and_busybox_images(client: CriClient) -> None:
    assert client.version().runtime_api_version == "v1"
    tags = {tag for image in client.list_images() for tag in image.repo_tags}
    assert {PAUSE_IMAGE, local_images.BUSYBOX_REFERENCE} <= tags
    assert client.image_status("docker.io/library/no-such-image:never") is None


# ---- pod sandbox ----


def test_pod_sandbox_is_ready_with_the_ip_cni_assigned(
    cri_ctd: CriContainerd, client: CriClient, pod: Pod
) -> None:
    reply = client.pod_sandbox_status(pod.id, verbose=True)
    assert reply.status.state == cri.SANDBOX_READY
    ip = ipaddress.ip_address(reply.status.network.ip)
    assert ip in cri_ctd.network.subnet and ip != cri_ctd.network.gateway
    spec = json.loads(reply.info["info"])["runtimeSpec"]
    netns = next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network")
    assert Path(netns).parent == cri_ctd.netns_dir


def test_list_pod_sandbox_filters_by_id(client: CriClient, pod: Pod) -> None:
    listed = client.list_pod_sandbox(pod_id=pod.id)
    assert [p.id for p in listed] == [pod.id]
    assert listed[0].metadata.name == "web" and listed[0].runtime_handler == "runc"


# ---- containers ----


def test_started_container_is_running(client: CriClient, pod: Pod, sleeper: str) -> None:
    assert client.container_status(sleeper).status.state == cri.CONTAINER_RUNNING
    listed = client.list_containers(pod_id=pod.id, state=cri.CONTAINER_RUNNING)
    assert sleeper in {c.id for c in listed}


def test_exec_sync_returns_stdout_stderr_and_exit_code(client: CriClient, sleeper: str) -> None:
    result = client.exec_sync(sleeper, ["sh", "-c", "echo hi; echo oops >&2; exit 3"], timeout=30)
    assert result == (3, b"hi\n", b"oops\n")


def test_server_in_the_pod_is_reachable_from_the_host_at_the_pod_ip(
    client: CriClient, pod: Pod
) -> None:
    script = "mkdir /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 8080 -h /www"
    httpd = start_container(client, pod, container_config("httpd", ["sh", "-c", script]))
    try:
        ip = client.pod_sandbox_status(pod.id).status.network.ip
        reply = http_get(ip, 8080, "/index.html")
        assert reply.startswith(b"HTTP/1.") and reply.endswith(b"hello-from-pod\n")
    finally:
        remove_container(client, httpd)


# ---- stats and resources ----


def test_container_stats_report_memory_in_use(client: CriClient, sleeper: str) -> None:
    stats = client.container_stats(sleeper)
    assert stats.attributes.id == sleeper
    assert stats.memory.usage_bytes.value > 0
    assert stats.memory.working_set_bytes.value > 0


def test_list_container_stats_filters_by_pod_and_by_id(
    client: CriClient, pod: Pod, sleeper: str
) -> None:
    in_pod = {s.attributes.id for s in client.list_container_stats(pod_sandbox_id=pod.id)}
    assert sleeper in in_pod
    assert in_pod <= {c.id for c in client.list_containers(pod_id=pod.id)}
    assert [s.attributes.id for s in client.list_container_stats(container_id=sleeper)] == [sleeper]


def test_update_container_resources_sets_the_cgroup_memory_limit(
    client: CriClient, sleeper: str
) -> None:
    client.update_container_resources(
        sleeper, cri.LinuxContainerResources(memory_limit_in_bytes=64 * MiB)
    )
    assert _host_memory_limit(_pid(client, sleeper)) == 64 * MiB
    inside = client.exec_sync(sleeper, ["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
    assert inside == (0, f"{64 * MiB}\n".encode(), b"")


# ---- teardown ----


def test_stopping_and_removing_a_pod_leaves_no_netns_veth_or_mount(
    cri_ctd: CriContainerd, client: CriClient
) -> None:
    ports = Path("/sys/class/net", cri_ctd.network.bridge, "brif")
    before = set(os.listdir(ports)) if ports.exists() else set()
    pod = _run_pod(cri_ctd, client, "brief")
    container = start_container(client, pod, container_config("sleeper", ["sleep", "3600"]))
    spec = json.loads(client.pod_sandbox_status(pod.id, verbose=True).info["info"])["runtimeSpec"]
    netns = next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network")
    (veth,) = set(os.listdir(ports)) - before
    assert Path(netns).exists() and _mount_lines(pod.id, container)

    remove_container(client, container)
    remove_pod(client, pod)

    assert not Path(netns).exists()
    assert not Path("/sys/class/net", veth).exists()
    assert _mount_lines(pod.id, container, netns) == []
    assert client.list_pod_sandbox(pod_id=pod.id) == []
    assert client.list_containers(container_id=container) == []


# ---- containerd's Tasks API on a plain (non-CRI) containerd ----


@pytest.fixture(scope="module")
def plain_ctd(containerd_binaries: ContainerdBinaries) -> Iterator[Containerd]:
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {}, containerd_binaries)
    try:
        tarball = local_images.build_busybox(daemon.base / "busybox.tar")
        daemon.ctr("image", "import", str(tarball))
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def ctr_sleeper(plain_ctd: Containerd) -> Iterator[str]:
    # runc puts a `ctr run` task in /<namespace>/<id> of every hierarchy and
    # leaves the namespace's own cgroup behind: remove it if this test made it
    new_parents = [d / "default" for d in Path("/sys/fs/cgroup").iterdir() if d.is_dir()]
    new_parents = [d for d in new_parents if not d.exists()]
    name = f"t-{uuid.uuid4().hex[:10]}"
    plain_ctd.ctr("run", "-d", local_images.BUSYBOX_REFERENCE, name, "sleep", "3600")
    yield name
    plain_ctd.ctr("task", "rm", "-f", name, check=False)
    plain_ctd.ctr("container", "rm", name, check=False)
    for parent in new_parents:
        with contextlib.suppress(OSError):  # only if empty: others may use it now
            parent.rmdir()


@pytest.fixture(scope="module")
def tasks(plain_ctd: Containerd) -> Iterator[TasksClient]:
    with TasksClient(plain_ctd.address, namespace="default") as client:
        yield client


def _task_pid(daemon: Containerd, name: str) -> int:
    for line in daemon.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        task, pid, _status = line.split()
        if task == name:
            return int(pid)
    raise AssertionError(f"no task {name}")


def test_tasks_update_sets_the_memory_limit_of_a_ctr_run_container(
    plain_ctd: Containerd, tasks: TasksClient, ctr_sleeper: str
) -> None:
    tasks.update(ctr_sleeper, {"memory": {"limit": 48 * MiB}})
    assert _host_memory_limit(_task_pid(plain_ctd, ctr_sleeper)) == 48 * MiB


def test_tasks_metrics_reports_cgroup_stats_of_one_task(
    tasks: TasksClient, ctr_sleeper: str
) -> None:
    (metric,) = tasks.metrics([f"id=={ctr_sleeper}"])
    assert metric.id == ctr_sleeper
    assert metric.data.type_url.endswith("io.containerd.cgroups.v1.Metrics")
    assert metric.timestamp.seconds > 0
