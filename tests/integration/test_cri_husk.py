"""The kubelet's path with husk: containerd's CRI plugin, a ``husk`` runtime handler, real CNI.

One CRI containerd (``CriContainerd``: its own root, socket, CNI bridge and
local pause image) serves the module, with three husk handlers, each with its
own ``ConfigPath`` and no ``$HUSK_CONFIG`` in the environment, so a handler's
options are the only way the shim can learn its configuration:

- ``husk``: cold-booted sandboxes in ``state_root``;
- ``husk-template``: sandboxes cloned from the session's VM template, in
  ``template_root`` (the pods of the lifecycle tests, which need no cold boot);
- ``husk-broken``: a configuration with an unknown key;
- ``husk-pool``: sandboxes in VMs of a VM pool (``[factory] vm_cache_number``,
  its members clones of the session's template), in ``pool_root``; its daemon
  runs for the module's last tests.

Driven over CRI v1 gRPC as the kubelet drives it (``tests.kubelet``), these
are the scenarios of containerd's CRI integration suite that it runs against
Kata: stats by id and by sandbox, duplicate names, memory update, sandbox
clean remove and killed-VMM clean-up.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.sandbox import cleanup
from tests.integration.containerd import sandbox_dirs
from tests.integration.containerd_versions import ContainerdBinaries
from tests.integration.vm_pool import running_pool, wait_full
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.client import CriClient, GRPCError
from tests.kubelet.cri_containerd import CriContainerd, husk_handler
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
CLONED = "cloned from the VM template"
FROM_POOL = "from the VM pool"
MEMORY_ANNOTATION = "io.husk.config.hypervisor.default_memory"
#: the "web" pod's VM memory, set by its annotation (the configured default is 512)
POD_MEMORY_MIB = 768


def _skip_reason() -> str | None:
    if not os.path.exists("/var/lib/husk/images/initrd.img"):
        return "no guest image: run `husk image build`"
    return skip_reason()


pytestmark = [pytest.mark.integration]
_REASON = _skip_reason()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@dataclass(frozen=True)
class Roots:
    """The state dirs of the working handlers."""

    cold: Path
    template: Path
    pool: Path


@pytest.fixture(scope="module")
def roots(shared_template: str) -> Iterator[Roots]:
    # short: CRI ids are 64 characters and a VM's sockets live under <root>/<id>/
    base = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))
    yield Roots(base / "c", base / "t", base / "p")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cri_ctd(
    roots: Roots, shared_template: str, containerd_binaries: ContainerdBinaries
) -> Iterator[CriContainerd]:
    configs = roots.cold.parent
    cold = configs / "husk.toml"
    cold.write_text(
        f'[runtime]\nstate_dir = "{roots.cold}"\n'
        '[hypervisor.qemu]\nenable_annotations = ["default_memory"]\n'
    )
    clones = configs / "husk-template.toml"
    clones.write_text(f'[runtime]\nstate_dir = "{roots.template}"\n{shared_template}')
    pooled = configs / "husk-pool.toml"
    pooled.write_text(
        f'[runtime]\nstate_dir = "{roots.pool}"\n{shared_template}'
        f'vm_cache_number = 1\nvm_cache_endpoint = "{configs / "pool.sock"}"\n'
    )
    broken = configs / "husk-broken.toml"
    broken.write_text("[runtime]\nno_such_key = 1\n")
    env = {"HUSK_CONFIG": ""}  # the handlers' ConfigPath is all the shims get
    daemon = CriContainerd(
        Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")),
        runtimes={
            "husk": husk_handler(cold),
            "husk-template": husk_handler(clones),
            "husk-broken": husk_handler(broken),
            "husk-pool": husk_handler(pooled),
        },
        env=env,
        binaries=containerd_binaries,
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def client(cri_ctd: CriContainerd) -> CriClient:
    assert cri_ctd.cri is not None
    return cri_ctd.cri


def _run_pod(
    cri_ctd: CriContainerd,
    client: CriClient,
    name: str,
    handler: str,
    annotations: dict[str, str] | None = None,
) -> Pod:
    config = pod_config(name, log_directory=cri_ctd.base / "pods" / name, annotations=annotations)
    return Pod(client.run_pod_sandbox(config, handler), config)


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


def _netns(client: CriClient, pod_id: str) -> str:
    info = json.loads(client.pod_sandbox_status(pod_id, verbose=True).info["info"])
    spec = info["runtimeSpec"]
    return str(next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network"))


def _mount_points(*needles: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if any(n in line for n in needles)]


def _leftovers(root: Path, pod_id: str, netns: str) -> list[str]:
    found = [f"state dir {d}" for d in sandbox_dirs(root) if d.name == pod_id]
    found += [f"process {pid}" for pid in cleanup.processes_naming(root / pod_id)]
    found += [f"mount {m}" for m in _mount_points(pod_id)]
    found += [f"netns {netns}"] if os.path.exists(netns) else []
    return found


def _wait_gone(root: Path, pod_id: str, netns: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while _leftovers(root, pod_id, netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _leftovers(root, pod_id, netns)


def _out(client: CriClient, container_id: str, script: str) -> str:
    result = client.exec_sync(container_id, ["sh", "-c", script], timeout=60)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def _mem_total_mib(client: CriClient, container_id: str) -> int:
    kib = re.search(r"MemTotal:\s+(\d+) kB", _out(client, container_id, "cat /proc/meminfo"))
    assert kib is not None
    return int(kib.group(1)) // 1024


def _processors(client: CriClient, container_id: str) -> int:
    return int(_out(client, container_id, "grep -c ^processor /proc/cpuinfo"))


# ---- one pod on the `husk` handler (cold boot), shared by the module ----


@pytest.fixture(scope="module")
def pod(cri_ctd: CriContainerd, client: CriClient) -> Iterator[Pod]:
    pod = _run_pod(cri_ctd, client, "web", "husk", {MEMORY_ANNOTATION: str(POD_MEMORY_MIB)})
    yield pod
    remove_pod(client, pod)


@pytest.fixture(scope="module")
def sleeper(client: CriClient, pod: Pod) -> Iterator[str]:
    container_id = start_container(client, pod, container_config("sleeper", ["sleep", "3600"]))
    yield container_id
    remove_container(client, container_id)


@pytest.fixture(scope="module")
def worker(client: CriClient, pod: Pod) -> Iterator[str]:
    """A container that burns some CPU and holds some memory while it sleeps."""
    # the shell outlives the sleep (ash would exec a last simple command, freeing x)
    script = (
        "x=$(head -c 8000000 /dev/zero | tr '\\0' a); "
        "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; sleep 3600; echo ${#x}"
    )
    container_id = start_container(client, pod, container_config("worker", ["sh", "-c", script]))
    yield container_id
    remove_container(client, container_id)


def test_the_handlers_config_path_decides_where_the_sandbox_lives(roots: Roots, pod: Pod) -> None:
    assert [d.name for d in sandbox_dirs(roots.cold)] == [pod.id]


def test_a_pod_is_one_vm_whose_containers_share_boot_id_and_network(
    client: CriClient, roots: Roots, pod: Pod, sleeper: str, worker: str
) -> None:
    assert len(_vmms(roots.cold, pod.id)) == 1
    script = "cat /proc/sys/kernel/random/boot_id; ip -4 -o addr show dev eth0"
    first, second = (_out(client, c, script) for c in (sleeper, worker))
    assert first == second
    pod_ip = client.pod_sandbox_status(pod.id).status.network.ip
    assert f"inet {pod_ip}/" in first
    assert len(_vmms(roots.cold, pod.id)) == 1


@pytest.mark.containerd_lines("2.4")
def test_a_pods_containers_join_its_shim_without_a_start_of_their_own(
    cri_ctd: CriContainerd, roots: Roots, pod: Pod, sleeper: str
) -> None:
    # start answered the pod's BootstrapParams with version 3: containerd 2.3+
    # reuses the pod's bootstrap (task API v3) instead of running start again
    tasks = cri_ctd.state / "io.containerd.runtime.v2.task" / "k8s.io"
    pods, containers = (
        json.loads((tasks / i / "bootstrap.json").read_text()) for i in (pod.id, sleeper)
    )
    assert pods == containers == {
        "version": 3, "address": f"unix://{roots.cold / pod.id / 'shim.sock'}", "protocol": "ttrpc",
    }  # fmt: skip
    assert not (tasks / sleeper / "husk-options.json").exists()  # what start leaves


def test_a_pod_annotation_sizes_its_vm_where_the_config_enables_it(
    client: CriClient, sleeper: str
) -> None:
    # MemTotal is what the guest kernel has left of the VM's memory (~60 MiB less)
    assert POD_MEMORY_MIB - 100 < _mem_total_mib(client, sleeper) <= POD_MEMORY_MIB


def test_a_pod_annotation_the_config_does_not_enable_fails_in_one_line_and_leaves_nothing(
    cri_ctd: CriContainerd, client: CriClient, roots: Roots, pod: Pod
) -> None:
    with pytest.raises(GRPCError) as failure:
        _run_pod(
            cri_ctd, client, "greedy", "husk", {"io.husk.config.hypervisor.default_vcpus": "2"}
        )
    message = str(failure.value.message)
    assert 'add "default_vcpus" to enable_annotations' in message
    assert "\n" not in message.strip()
    assert [d.name for d in sandbox_dirs(roots.cold)] == [pod.id]


def test_pod_sandbox_status_reports_the_ip_cni_assigned(
    cri_ctd: CriContainerd, client: CriClient, pod: Pod
) -> None:
    status = client.pod_sandbox_status(pod.id).status
    assert status.state == cri.SANDBOX_READY
    ip = ipaddress.ip_address(status.network.ip)
    assert ip in cri_ctd.network.subnet and ip != cri_ctd.network.gateway
    assert client.list_pod_sandbox(pod_id=pod.id)[0].runtime_handler == "husk"


def test_exec_sync_returns_stdout_stderr_and_exit_code(client: CriClient, sleeper: str) -> None:
    result = client.exec_sync(sleeper, ["sh", "-c", "echo hi; echo oops >&2; exit 3"], timeout=60)
    assert result == (3, b"hi\n", b"oops\n")


def test_a_server_in_the_pod_answers_the_host_at_the_pod_ip(client: CriClient, pod: Pod) -> None:
    script = "mkdir /www && echo hello-from-vm > /www/index.html && exec httpd -f -p 8080 -h /www"
    httpd = start_container(client, pod, container_config("httpd", ["sh", "-c", script]))
    try:
        ip = client.pod_sandbox_status(pod.id).status.network.ip
        reply = http_get(ip, 8080, "/index.html")
        assert reply.startswith(b"HTTP/1.") and reply.endswith(b"hello-from-vm\n")
    finally:
        remove_container(client, httpd)


def test_container_stats_report_memory_and_cpu_of_a_working_container(
    client: CriClient, worker: str
) -> None:
    deadline = time.monotonic() + 60
    while "done" not in _out(client, worker, "ps | grep -q 'sleep 3600' && echo done; true"):
        assert time.monotonic() < deadline, "the worker did not finish its work"
        time.sleep(0.5)
    stats = client.container_stats(worker)
    assert stats.attributes.id == worker
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 1_000_000


def test_list_container_stats_filters_by_sandbox_and_by_id(
    client: CriClient, pod: Pod, sleeper: str, worker: str
) -> None:
    in_pod = {s.attributes.id for s in client.list_container_stats(pod_sandbox_id=pod.id)}
    assert {sleeper, worker} <= in_pod
    assert in_pod <= {c.id for c in client.list_containers(pod_id=pod.id)}
    (only,) = client.list_container_stats(container_id=sleeper)
    assert only.attributes.id == sleeper and only.memory.working_set_bytes.value > 0


def test_update_container_resources_grows_memory_and_cpus_the_guest_sees(
    client: CriClient, sleeper: str
) -> None:
    memory, cpus = _mem_total_mib(client, sleeper), _processors(client, sleeper)
    client.update_container_resources(
        sleeper,
        cri.LinuxContainerResources(
            memory_limit_in_bytes=512 * MiB, cpu_period=100_000, cpu_quota=200_000
        ),
    )
    assert _mem_total_mib(client, sleeper) >= memory + 400
    assert _processors(client, sleeper) == max(cpus, 3)  # default_vcpus 1 + ceil(quota/period)
    limit = _out(client, sleeper, "cat /sys/fs/cgroup/memory.max 2>/dev/null || true").strip()
    assert limit in ("", str(512 * MiB))


def test_duplicate_pod_and_container_names_are_refused(
    cri_ctd: CriContainerd, client: CriClient, pod: Pod, sleeper: str
) -> None:
    with pytest.raises(GRPCError, match="reserve"):
        client.run_pod_sandbox(pod.config, "husk")
    with pytest.raises(GRPCError, match="reserve"):
        client.create_container(pod.id, container_config("sleeper", ["true"]), pod.config)
    assert len(client.list_pod_sandbox()) == len({p.id for p in client.list_pod_sandbox()})


# ---- the handler's ConfigPath ----


def test_a_handler_whose_config_is_broken_fails_run_pod_sandbox_in_one_line(
    cri_ctd: CriContainerd, client: CriClient
) -> None:
    before = {p.id for p in client.list_pod_sandbox()}
    with pytest.raises(GRPCError) as failure:
        _run_pod(cri_ctd, client, "broken", "husk-broken")
    message = str(failure.value.message)
    assert "husk-broken.toml" in message and "no_such_key" in message
    assert "\n" not in message.strip()
    assert {p.id for p in client.list_pod_sandbox()} <= before


# ---- pods on `husk-template`: clones of the session's template ----


def test_the_template_handler_starts_its_pods_as_clones(
    cri_ctd: CriContainerd, client: CriClient, roots: Roots
) -> None:
    pod = _run_pod(cri_ctd, client, "clone", "husk-template")
    netns = _netns(client, pod.id)
    try:
        container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
        assert client.exec_sync(container, ["true"], timeout=60).exit_code == 0
        assert [d.name for d in sandbox_dirs(roots.template)] == [pod.id]
        boots = [line for line in cri_ctd.log_text().splitlines() if f"sandbox {pod.id}: " in line]
        assert any(CLONED in line for line in boots)
    finally:
        remove_pod(client, pod)
    assert _wait_gone(roots.template, pod.id, netns) == []


def test_stop_and_remove_of_a_pod_leave_no_vmm_tap_mount_netns_or_state(
    cri_ctd: CriContainerd, client: CriClient, roots: Roots
) -> None:
    pod, container, netns = _pod_with_a_sleeper(cri_ctd, client, "brief")
    links = _in_netns(netns, "ip -o link show")
    filters = _in_netns(
        netns, "for d in $(ls /sys/class/net); do tc filter show dev $d ingress; done"
    )
    assert len(_vmms(roots.template, pod.id)) == 1 and _mount_points(pod.id)
    assert "tap0_husk" in links and "mirred" in filters, "the veth is not wired to the VM"

    remove_container(client, container)
    remove_pod(client, pod)

    assert _wait_gone(roots.template, pod.id, netns) == []
    assert client.list_pod_sandbox(pod_id=pod.id) == []
    assert client.list_containers(container_id=container) == []


def _pod_with_a_sleeper(
    cri_ctd: CriContainerd, client: CriClient, name: str
) -> tuple[Pod, str, str]:
    """A ``husk-template`` pod with one sleeping container: (pod, container id, netns path)."""
    pod = _run_pod(cri_ctd, client, name, "husk-template")
    container = start_container(client, pod, container_config("sleeper", ["sleep", "3600"]))
    return pod, container, _netns(client, pod.id)


def _in_netns(netns: str, script: str) -> str:
    """What ``script`` prints in the pod's network namespace."""
    return subprocess.run(
        ["nsenter", f"--net={netns}", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def test_removing_a_running_pod_without_stopping_it_first_cleans_up(
    cri_ctd: CriContainerd, client: CriClient, roots: Roots
) -> None:
    pod, _, netns = _pod_with_a_sleeper(cri_ctd, client, "abrupt")
    client.remove_pod_sandbox(pod.id)
    assert _wait_gone(roots.template, pod.id, netns) == []
    assert client.list_pod_sandbox(pod_id=pod.id) == []


def test_a_killed_vmm_makes_the_pod_notready_its_containers_exited_and_removal_clean(
    cri_ctd: CriContainerd, client: CriClient, roots: Roots
) -> None:
    pod, container, netns = _pod_with_a_sleeper(cri_ctd, client, "doomed")
    (vmm,) = _vmms(roots.template, pod.id)
    os.kill(vmm, 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pod_state = client.pod_sandbox_status(pod.id).status.state
        container_state = client.container_status(container).status
        if pod_state == cri.SANDBOX_NOTREADY and container_state.state == cri.CONTAINER_EXITED:
            break
        time.sleep(0.3)
    assert client.pod_sandbox_status(pod.id).status.state == cri.SANDBOX_NOTREADY
    status = client.container_status(container).status
    assert status.state == cri.CONTAINER_EXITED and status.exit_code == 137

    remove_pod(client, pod)
    assert _wait_gone(roots.template, pod.id, netns) == []
    assert client.list_containers(container_id=container) == []


# ---- pods on `husk-pool`: VMs booted and exercised before their pod came ----


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that init has yet to reap does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


@pytest.fixture(scope="module")
def pool_toml(cri_ctd: CriContainerd, roots: Roots) -> Iterator[Path]:
    """The ``husk-pool`` handler's config, its daemon running (until the module ends)."""
    with running_pool(roots.pool.parent / "husk-pool.toml") as config:
        yield config


def test_the_pool_handler_starts_its_pods_in_pool_vms_and_leaves_nothing(
    cri_ctd: CriContainerd, client: CriClient, roots: Roots, pool_toml: Path
) -> None:
    wait_full(pool_toml)
    pod = _run_pod(cri_ctd, client, "pooled", "husk-pool")
    netns = _netns(client, pod.id)
    try:
        container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
        assert client.exec_sync(container, ["true"], timeout=60).exit_code == 0
        boots = [line for line in cri_ctd.log_text().splitlines() if f"sandbox {pod.id}: " in line]
        assert any(FROM_POOL in line for line in boots), boots
        record = json.loads((roots.pool / pod.id / "sandbox.json").read_text())
        # its QEMU's command line names the pool VM's first state dir, not the pod's
        (vmm,) = [r["pid"] for r in record["resources"] if r["kind"] == "process"]
        assert os.path.exists(f"/proc/{vmm}")
    finally:
        remove_pod(client, pod)
    assert _wait_gone(roots.pool, pod.id, netns) == []
    assert not _running(vmm)
    wait_full(pool_toml)  # and the pool has booted the next


def test_two_pool_pods_share_no_randomness_boot_id_hostname_or_mac(
    cri_ctd: CriContainerd, client: CriClient, pool_toml: Path
) -> None:
    probe = (
        "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | "
        "tr -d ' \\n'; echo; hostname; cat /sys/class/net/eth0/address"
    )
    pods: list[Pod] = []
    try:
        probes = []
        for name in ("pool-a", "pool-b"):
            wait_full(pool_toml)
            pod = _run_pod(cri_ctd, client, name, "husk-pool")
            pods.append(pod)
            container = start_container(client, pod, container_config("c", ["sleep", "3600"]))
            probes.append(_out(client, container, probe).split())
        boots = [line for line in cri_ctd.log_text().splitlines() if FROM_POOL in line]
        assert all(any(f"sandbox {p.id}: " in line for line in boots) for p in pods)
        (boot_a, rng_a, host_a, mac_a), (boot_b, rng_b, host_b, mac_b) = probes
        assert boot_a != boot_b and rng_a != rng_b and mac_a != mac_b
        assert (host_a, host_b) == ("pool-a", "pool-b")
    finally:
        for pod in pods:
            remove_pod(client, pod)
