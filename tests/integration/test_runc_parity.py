"""What a container's process sees is what runc shows it: the same container side by side.

Each probe runs one script in a runc container and in a husk container made
from the same spec on the same containerd, and compares what they print. A
VM must differ in a few places; those are the :data:`RULES` below, written
once, each with its reason, and a probe that meets one checks the rule instead
of equality. Everything else must be equal.

Containers are shared: each :class:`~tests.integration.parity.Pair` (started
once per module, all at once, husk's as clones of the session's VM template)
runs every probe its spec allows, through ``ctr task exec``. Probes read
``/proc/1/...`` (the container's init, made by ``create``) as well as
``/proc/self/...`` (an exec'd process), so both ways a runtime starts a
process are compared. The CRI probes run in one pod per handler.

The containerd is the ``ctd`` fixture (``cri_ctd`` for CRI), one per release
of the suite's containerd matrix (``containerd_binaries``, see conftest): the
parity holds on every containerd husk serves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.cli import local_images
from tests.integration.containerd import Containerd
from tests.integration.containerd_versions import ContainerdBinaries
from tests.integration.parity import CriContainers, CriPair, Pair, Seen, start_pairs
from tests.integration.test_shim_containerd import _REASON, leftovers
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.client import TasksClient
from tests.kubelet.cri_containerd import CriContainerd, husk_handler
from tests.kubelet.pods import container_config, pod_config

pytestmark = [pytest.mark.integration]
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))

MIB = 1 << 20


@dataclass(frozen=True)
class Rule:
    """A difference a VM must show: where it shows, why, and what is checked instead."""

    where: str
    reason: str
    instead: str


#: The allowed differences between runc and husk. A probe that meets one names it.
RULES = {
    "cgroup-v1-host": Rule(
        "/sys/fs/cgroup and /proc/self/cgroup",
        "runc shows the host's cgroups and this host may run cgroup v1; the guest always runs v2",
        "the limits read the same (memory.limit_in_bytes = memory.max, cfs quota/period = "
        "cpu.max, pids.max); husk shows what runc shows on a v2 host: its own cgroup at "
        "/sys/fs/cgroup and 0::/ in /proc/self/cgroup. On a v2 host: equality",
    ),
    "kernel-files": Rule(
        "paths the kernel has or lacks (/proc/kcore, /proc/sysrq-trigger, /dev/core)",
        "each side runs its own kernel (the host's, the guest's), built with its own "
        "options (CONFIG_PROC_KCORE, CONFIG_MAGIC_SYSRQ); runc links /dev/core only where "
        "/proc/kcore exists",
        "a path present on both sides behaves the same; /dev/core exists exactly where "
        "/proc/kcore does",
    ),
    "machine-rlimits": Rule(
        "RLIMIT_NPROC and RLIMIT_SIGPENDING when the spec sets none",
        "the kernel sizes them from the machine's memory: the host's, the VM's",
        "every other limit (those in the spec among them) is equal",
    ),
    "machine-devices": Rule(
        "/dev of a --privileged container",
        "a privileged container gets the machine's devices: the host's under runc, the "
        "VM's under husk",
        "the devices every Linux machine has are there on both sides, with the same "
        "type, numbers and mode; every device node names a device of the machine (/sys/dev)",
    ),
}

#: containerd's default masked and read-only paths (oci.populateDefaultUnixSpec)
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
#: the devices of every machine (runc's and the OCI spec's default devices)
STANDARD_DEVICES = ["full", "null", "random", "tty", "urandom", "zero"]
CGROUP_MOUNT = "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev:relatime"
SECCOMP_PROFILE = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
}


# ---- containerd and the containers ----


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="hpar-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def husk_config(state_root: Path, shared_template: str) -> Iterator[Path]:
    config = state_root.with_name(state_root.name + ".toml")
    config.write_text(f'[runtime]\nstate_dir = "{state_root}"\n{shared_template}')
    yield config
    config.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ctd(
    husk_config: Path, state_root: Path, containerd_binaries: ContainerdBinaries
) -> Iterator[Containerd]:
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(base, {"HUSK_CONFIG": str(husk_config)}, containerd_binaries)
    local_images.build_busybox(base / "busybox.tar")
    daemon.ctr("image", "import", str(base / "busybox.tar"))
    yield daemon
    daemon.stop()
    deadline = time.monotonic() + 15
    while leftovers(state_root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(state_root) == []


@dataclass(frozen=True)
class Pairs:
    """The module's containers, each under runc and husk."""

    plain: Pair
    seccomp: Pair
    custom_seccomp: Pair
    privileged: Pair


@pytest.fixture(scope="module")
def pairs(ctd: Containerd) -> Iterator[Pairs]:
    volume = Path(tempfile.mkdtemp(prefix="hvol-", dir="/tmp"))
    (volume / "data").write_text("data\n")
    profile = volume.with_suffix(".json")
    profile.write_text(json.dumps(SECCOMP_PROFILE))
    all_pairs = Pairs(
        plain=Pair(
            ctd,
            "plain",
            [
                "--mount",
                CGROUP_MOUNT,
                "--mount",
                f"type=bind,src={volume},dst=/vol,options=rbind:ro:nosuid:nodev:noexec",
                "--memory-limit",
                str(128 * MIB),
                "--env",
                "PARITY=yes",
                "--cwd",
                "/tmp",
            ],
        ),
        seccomp=Pair(ctd, "seccomp", ["--seccomp"]),
        custom_seccomp=Pair(ctd, "custom", ["--seccomp", "--seccomp-profile", str(profile)]),
        privileged=Pair(ctd, "priv", ["--privileged"]),
    )
    members = [all_pairs.plain, all_pairs.seccomp, all_pairs.custom_seccomp, all_pairs.privileged]
    try:
        start_pairs(members)
        yield all_pairs
    finally:
        for pair in members:
            pair.remove()
        shutil.rmtree(volume, ignore_errors=True)
        profile.unlink(missing_ok=True)


# ---- what the probes compare ----


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def fields(text: str) -> dict[str, str]:
    """``key value`` lines (the first word is the key)."""
    return {k: v for k, _, v in (line.partition(" ") for line in lines(text))}


@dataclass(frozen=True)
class Limits:
    """A container's cgroup limits, whichever cgroup version shows them."""

    memory: int | None
    cpu_quota: int | None
    cpu_period: int
    pids: int | None


#: reads the limits under v1 or v2, whichever /sys/fs/cgroup holds
READ_LIMITS = (
    "cd /sys/fs/cgroup; if [ -e cgroup.controllers ]; then echo v2; "
    "cat memory.max cpu.max pids.max; test -e memory.events && echo events; "
    "else echo v1; cat memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us "
    "cpu/cpu.cfs_period_us pids/pids.max; fi"
)
#: v1's "no memory limit" (PAGE_COUNTER_MAX pages, rounded down to a page)
V1_NO_MEMORY_LIMIT = 9223372036854771712


def limits(text: str) -> Limits:
    out = lines(text)
    if out[0] == "v2":
        quota, period = out[2].split()
        return Limits(
            memory=None if out[1] == "max" else int(out[1]),
            cpu_quota=None if quota == "max" else int(quota),
            cpu_period=int(period),
            pids=None if out[3] == "max" else int(out[3]),
        )
    assert out[0] == "v1", text
    v1_memory, v1_quota = int(out[1]), int(out[2])
    return Limits(
        memory=None if v1_memory == V1_NO_MEMORY_LIMIT else v1_memory,
        cpu_quota=None if v1_quota == -1 else v1_quota,
        cpu_period=int(out[3]),
        pids=None if out[4] == "max" else int(out[4]),
    )


def check_cgroup_limits(seen: Seen) -> Limits:
    """Both sides read the same limits (rule cgroup-v1-host); husk's cgroup is v2."""
    assert lines(seen.husk)[0] == "v2" and "events" in lines(seen.husk), seen.husk
    assert limits(seen.runc) == limits(seen.husk), RULES["cgroup-v1-host"].instead
    return limits(seen.husk)


def host_is_cgroup_v2() -> bool:
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()


def without_core(listing: str, kcore: bool) -> list[str]:
    """``/dev`` without ``core``, after checking it is there exactly when /proc/kcore is."""
    entries = lines(listing)
    core = [e for e in entries if e.startswith("'core'") or e.startswith("core ")]
    assert bool(core) == kcore, (RULES["kernel-files"].instead, entries)
    return [e for e in entries if e not in core and e != "kcore"]


LIST_DEV = (
    "cd /dev && for f in $(ls -A | sort); do stat -c '%N %F %a %u:%g %t:%T' $f; done; "
    "if [ -e /proc/kcore ]; then echo kcore; fi"
)


def mount_flags(points: list[str]) -> str:
    """A script printing each mount point's per-mount flags (mountinfo field 6)."""
    wanted = " ".join(points)
    return (
        f"for p in {wanted}; do awk -v p=$p '$5 == p {{ print p, $6 }}' /proc/self/mountinfo; done"
    )


# ---- cgroups ----


def test_proc_self_cgroup_is_the_containers_own_root(pairs: Pairs) -> None:
    seen = pairs.plain.run("cat /proc/self/cgroup /proc/1/cgroup")
    if host_is_cgroup_v2():
        assert seen.husk == seen.runc
    assert lines(seen.husk) == ["0::/", "0::/"], RULES["cgroup-v1-host"].instead


def test_cgroup_limits_from_the_spec_read_as_under_runc(pairs: Pairs) -> None:
    seen = pairs.plain.run(READ_LIMITS)
    assert check_cgroup_limits(seen) == Limits(128 * MIB, None, 100000, None)


def test_cgroup_limits_after_update_read_as_under_runc(ctd: Containerd, pairs: Pairs) -> None:
    resources = {
        "memory": {"limit": 192 * MIB},
        "cpu": {"quota": 50000, "period": 100000},
        "pids": {"limit": 64},
    }
    with TasksClient(ctd.address) as tasks:
        for name in pairs.plain.names.values():
            tasks.update(name, resources)
    seen = pairs.plain.run(READ_LIMITS)
    assert check_cgroup_limits(seen) == Limits(192 * MIB, 50000, 100000, 64)


# ---- credentials, capabilities, seccomp ----


STATUS = "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/1/status /proc/self/status"


def test_capabilities_and_no_new_privileges(pairs: Pairs) -> None:
    seen = pairs.plain.run(STATUS)
    assert seen.husk == seen.runc
    assert "/proc/1/status:NoNewPrivs:\t1" in seen.husk


def test_no_seccomp_filter_by_default(pairs: Pairs) -> None:
    seen = pairs.plain.run("grep -E '^Seccomp' /proc/1/status /proc/self/status")
    assert seen.husk == seen.runc
    assert "/proc/self/status:Seccomp:\t0" in seen.husk


def test_seccomp_with_containerds_default_profile(pairs: Pairs) -> None:
    seen = pairs.seccomp.run(f"{STATUS}; unshare -U true; echo unshare=$?")
    assert seen.husk == seen.runc
    assert "/proc/self/status:Seccomp:\t2" in seen.husk


def test_seccomp_with_a_custom_profile(pairs: Pairs) -> None:
    seen = pairs.custom_seccomp.run(f"{STATUS}; mkdir /tmp/d; echo mkdir=$?; touch /tmp/f; echo $?")
    assert seen.husk == seen.runc
    assert "mkdir=1" in seen.husk


def test_uid_gid_and_groups_of_an_image_user(pairs: Pairs) -> None:
    seen = pairs.plain.run("id; grep -E '^(Uid|Gid|Groups)' /proc/self/status", "--user", "nobody")
    assert seen.husk == seen.runc
    assert "uid=65534(nobody)" in seen.husk


def test_uid_gid_of_a_numeric_user(pairs: Pairs) -> None:
    seen = pairs.plain.run(
        "id; grep -E '^(Uid|Gid|Groups)' /proc/self/status", "--user", "1000:1000"
    )
    assert seen.husk == seen.runc
    assert "uid=1000" in seen.husk


# ---- process attributes ----


def test_rlimits_from_the_spec(pairs: Pairs) -> None:
    seen = pairs.plain.run("cat /proc/1/limits; echo; cat /proc/self/limits")
    machine = ("Max processes", "Max pending signals")  # RULES["machine-rlimits"]

    def spec_limits(text: str) -> list[str]:
        return [line for line in lines(text) if not line.startswith(machine)]

    assert spec_limits(seen.husk) == spec_limits(seen.runc)
    assert "Max open files            1024                 1024" in seen.husk


def test_umask(pairs: Pairs) -> None:
    seen = pairs.plain.run("umask; grep Umask /proc/1/status")
    assert seen.husk == seen.runc


def test_oom_score_adj(pairs: Pairs) -> None:
    seen = pairs.plain.run("cat /proc/1/oom_score_adj /proc/self/oom_score_adj")
    assert seen.husk == seen.runc


def test_env_and_cwd(pairs: Pairs) -> None:
    seen = pairs.plain.run("pwd; env | sort; tr '\\0' '\\n' < /proc/1/environ | sort")
    assert seen.husk == seen.runc
    assert "PARITY=yes" in seen.husk


# ---- filesystem ----


def test_masked_paths_show_nothing(pairs: Pairs) -> None:
    script = (
        f"for p in {' '.join(MASKED_PATHS)}; do "
        "if [ -d $p ]; then echo $p dir $(ls -A $p | wc -l); "
        "elif [ -e $p ]; then echo $p file $(head -c 4096 $p | wc -c); "
        "else echo $p absent; fi; done"
    )
    seen = pairs.plain.run(script)
    runc, husk = fields(seen.runc), fields(seen.husk)
    assert set(runc) == set(husk) == set(MASKED_PATHS)
    for path in MASKED_PATHS:
        assert husk[path] in ("absent", "dir 0", "file 0"), path
        if "absent" not in (runc[path], husk[path]):  # RULES["kernel-files"]
            assert husk[path] == runc[path], path


def test_readonly_paths_are_mounted_read_only_with_procs_flags(pairs: Pairs) -> None:
    seen = pairs.plain.run(mount_flags(READONLY_PATHS))
    runc, husk = fields(seen.runc), fields(seen.husk)
    both = set(runc) & set(husk)  # RULES["kernel-files"]: sysrq-trigger needs CONFIG_MAGIC_SYSRQ
    assert {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"} <= both
    assert {p: husk[p] for p in both} == {p: runc[p] for p in both}
    assert all(flags.startswith("ro,") for flags in husk.values())


def test_dev_entries_and_their_modes(pairs: Pairs) -> None:
    seen = pairs.plain.run(LIST_DEV)
    runc = without_core(seen.runc, "kcore" in lines(seen.runc))
    husk = without_core(seen.husk, "kcore" in lines(seen.husk))
    assert husk == runc


def test_dev_shm_size_and_flags(pairs: Pairs) -> None:
    seen = pairs.plain.run(
        f"{mount_flags(['/dev/shm'])}; df -k /dev/shm | awk 'NR == 2 {{print $2}}'"
    )
    assert seen.husk == seen.runc
    assert lines(seen.husk)[-1] == "65536"


def test_volume_mount_flags(pairs: Pairs) -> None:
    seen = pairs.plain.run(f"{mount_flags(['/vol'])}; cat /vol/data; touch /vol/x; echo touch=$?")
    assert seen.husk == seen.runc
    assert lines(seen.husk)[0].split()[1].split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"]


# ---- privileged ----


def test_privileged_capabilities(pairs: Pairs) -> None:
    seen = pairs.privileged.run(STATUS)
    assert seen.husk == seen.runc
    assert "/proc/self/status:Seccomp:\t0" in seen.husk


def test_privileged_devices(pairs: Pairs) -> None:
    seen = pairs.privileged.run(LIST_DEV)

    def standard(text: str) -> list[str]:  # RULES["machine-devices"]
        return [e for e in lines(text) if e.split()[0].strip("'") in STANDARD_DEVICES]

    assert len(standard(seen.husk)) == len(STANDARD_DEVICES)
    assert standard(seen.husk) == standard(seen.runc)


#: prints each device node in /dev whose numbers name no device of this machine (/sys/dev)
FOREIGN_DEVICES = (
    "find /dev \\( -type b -o -type c \\) | while read -r f; do t=char; [ -b $f ] && t=block; "
    "n=$((0x$(stat -c %t $f))):$((0x$(stat -c %T $f))); [ -e /sys/dev/$t/$n ] || echo $f $n; done"
)


def test_privileged_devices_are_the_machines_own(pairs: Pairs) -> None:
    seen = pairs.privileged.run(FOREIGN_DEVICES)  # RULES["machine-devices"]
    assert (seen.runc, seen.husk) == ("", "")


# ---- CRI: a pod per handler ----


#: the shared pods' sysctls (IPC namespace); net.* ones are the pod network's, probed apart
POD_SYSCTLS = {"kernel.shm_rmid_forced": "1", "kernel.msgmax": "4096"}
POD_NET_SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "80", "net.ipv4.ping_group_range": "0 0"}
POD_DNS = cri.DNSConfig(servers=["10.0.0.10"], searches=["parity.svc"], options=["ndots:3"])


@pytest.fixture(scope="module")
def cri_ctd(husk_config: Path, containerd_binaries: ContainerdBinaries) -> Iterator[CriContainerd]:
    daemon = CriContainerd(
        Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")),
        runtimes={"husk": husk_handler(husk_config)},
        env={"HUSK_CONFIG": ""},
        binaries=containerd_binaries,
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def cri_pair(cri_ctd: CriContainerd) -> Iterator[CriPair]:
    assert cri_ctd.cri is not None
    pod = pod_config("parity", log_directory=cri_ctd.base / "pods")
    pod.linux.sysctls.update(POD_SYSCTLS)
    pod.dns_config.CopyFrom(POD_DNS)
    pair = CriPair(cri_ctd.cri)
    try:
        pair.start({"runc": "runc", "husk": "husk"}, pod, container_config("c", ["sleep", "3600"]))
        yield pair
    finally:
        pair.remove()


#: the /proc directory of a CRI probe container's init
CRI_INIT = "/proc/$(cat /tmp/init.pid)"


def cri_status(pattern: str) -> str:
    """A script printing the init's and an exec'd process's status lines, labelled."""
    return (
        f"grep -E '{pattern}' {CRI_INIT}/status | sed 's/^/init /'; "
        f"grep -E '{pattern}' /proc/self/status | sed 's/^/self /'"
    )


@pytest.fixture(scope="module")
def cri_restricted(cri_pair: CriPair) -> Iterator[CriContainers]:
    """A second container in each pod: a user with groups, RuntimeDefault seccomp, an OOM score."""
    # the pod's containers share its PID namespace (pid 1 is the pause process)
    config = container_config(
        "restricted", ["sh", "-c", "echo $$ > /tmp/init.pid; exec sleep 3600"]
    )
    context = config.linux.security_context
    context.run_as_user.value, context.run_as_group.value = 1000, 1000
    context.supplemental_groups.extend([2000, 3000])
    context.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault
    config.linux.resources.oom_score_adj = 500
    containers = cri_pair.add(config)
    yield containers
    containers.remove()


def test_cri_user_group_and_supplemental_groups(cri_restricted: CriContainers) -> None:
    seen = cri_restricted.run("id; " + cri_status("^(Uid|Gid|Groups)"))
    assert seen.husk == seen.runc
    groups = next(x for x in lines(seen.husk) if x.startswith("self Groups:"))
    assert {"2000", "3000"} <= set(groups.split()[2:])


def test_cri_runtime_default_seccomp_and_capabilities(cri_restricted: CriContainers) -> None:
    seen = cri_restricted.run(cri_status("^(Cap|NoNewPrivs|Seccomp)"))
    assert seen.husk == seen.runc
    assert "init Seccomp:\t2" in seen.husk and "self Seccomp:\t2" in seen.husk


def test_cri_oom_score_adj_from_the_spec(cri_restricted: CriContainers) -> None:
    seen = cri_restricted.run(f"cat {CRI_INIT}/oom_score_adj /proc/self/oom_score_adj")
    assert seen.husk == seen.runc
    assert lines(seen.husk)[0] == "500"


def test_cri_hostname_hosts_and_resolv_conf(cri_pair: CriPair) -> None:
    seen = cri_pair.run("hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf")
    assert seen.husk == seen.runc
    assert "search parity.svc" in seen.husk


def read_sysctls(sysctls: dict[str, str]) -> str:
    names = " ".join(name.replace(".", "/") for name in sysctls)
    return f"for n in {names}; do cat /proc/sys/$n; done"


def test_cri_pod_sysctls(cri_pair: CriPair) -> None:
    seen = cri_pair.run(read_sysctls(POD_SYSCTLS))
    assert seen.husk == seen.runc
    assert lines(seen.husk) == list(POD_SYSCTLS.values())


def test_cri_pod_network_sysctls(cri_ctd: CriContainerd) -> None:
    assert cri_ctd.cri is not None
    pod = pod_config("netsysctl", log_directory=cri_ctd.base / "pods")
    pod.linux.sysctls.update(POD_NET_SYSCTLS)
    pair = CriPair(cri_ctd.cri)
    try:
        pair.start({"runc": "runc", "husk": "husk"}, pod, container_config("c", ["sleep", "3600"]))
        seen = pair.run(read_sysctls(POD_NET_SYSCTLS))
    finally:
        pair.remove()
    assert seen.husk == seen.runc
    assert [" ".join(v.split()) for v in lines(seen.husk)] == list(POD_NET_SYSCTLS.values())


def test_cri_cgroup_is_the_containers_own(cri_pair: CriPair) -> None:
    seen = cri_pair.run("cat /proc/self/cgroup")
    if host_is_cgroup_v2():
        assert seen.husk == seen.runc
    assert lines(seen.husk) == ["0::/"], RULES["cgroup-v1-host"].instead


def test_cri_memory_limit_after_update_container_resources(cri_pair: CriPair) -> None:
    cri_pair.update(cri.LinuxContainerResources(memory_limit_in_bytes=256 * MIB))
    seen = cri_pair.run(READ_LIMITS)
    assert check_cgroup_limits(seen).memory == 256 * MIB


def test_every_rule_has_a_reason_and_what_is_checked_instead() -> None:
    for name, rule in RULES.items():
        assert rule.where and rule.reason and rule.instead, name
    source = Path(__file__).read_text()
    for name in RULES:
        assert source.count(f'RULES["{name}"]') >= 1, f"rule {name} is checked by no probe"
