"""Kata's protobuf OCI spec → runc config.json."""

from __future__ import annotations

from typing import Any

import pytest

from agent_proto import oci_pb2
from guest.agent.oci import (
    DEFAULT_PATH_ENV,
    pod_namespace_files,
    pod_sandbox_id,
    process_config,
    resources_config,
    runc_config,
)
from shim.errors import InvalidArgumentError
from shim.sandbox.oci import spec_from_json
from tests.unit.oci_samples import ctr_run_spec, every_field


def full_spec() -> oci_pb2.Spec:
    spec = oci_pb2.Spec(Version="1.0.2", Hostname="web")
    p = spec.Process
    p.Terminal = True
    p.ConsoleSize.Height, p.ConsoleSize.Width = 24, 80
    p.User.UID, p.User.GID = 1000, 1001
    p.User.AdditionalGids.extend([10, 20])
    p.Args.extend(["nginx", "-g", "daemon off;"])
    p.Env.extend(["PATH=/usr/bin", "A=b"])
    p.Cwd = "/srv"
    p.Capabilities.Bounding.append("CAP_NET_BIND_SERVICE")
    p.Capabilities.Effective.append("CAP_NET_BIND_SERVICE")
    p.Rlimits.add(Type="RLIMIT_NOFILE", Hard=4096, Soft=1024)
    p.NoNewPrivileges = True
    p.ApparmorProfile = "docker-default"
    p.OOMScoreAdj = 100
    spec.Root.Path = "/run/kata-containers/c1/rootfs"
    spec.Root.Readonly = True
    spec.Mounts.add(destination="/proc", source="proc", type="proc")
    spec.Mounts.add(destination="/data", source="/run/x/data", type="bind", options=["rbind", "ro"])
    spec.Hooks.Prestart.add(Path="/usr/bin/host-hook")
    spec.Annotations["io.kubernetes.cri.container-type"] = "container"
    linux = spec.Linux
    for ns in ("pid", "network", "ipc", "uts", "mount"):
        linux.Namespaces.add(Type=ns, Path="/proc/1/ns/x" if ns == "network" else "")
    linux.Namespaces[0].Path = "/proc/42/ns/pid"
    linux.CgroupsPath = "/kubepods/pod1/c1"
    linux.Sysctl["net.ipv4.ip_forward"] = "1"
    linux.Sysctl["kernel.shm_rmid_forced"] = "1"
    linux.MaskedPaths.append("/proc/kcore")
    linux.ReadonlyPaths.append("/proc/sys")
    linux.MountLabel = "system_u:object_r:container_file_t"
    r = linux.Resources
    r.Memory.Limit = 256 << 20
    r.CPU.Quota, r.CPU.Period, r.CPU.Shares, r.CPU.Cpus = 50000, 100000, 512, "0-63"
    r.Pids.Limit = 100
    r.Devices.add(Allow=False, Access="rwm")
    r.Devices.add(Allow=True, Type="c", Major=1, Minor=-1, Access="rw")
    linux.Seccomp.DefaultAction = "SCMP_ACT_ERRNO"
    linux.Seccomp.Architectures.append("SCMP_ARCH_X86_64")
    call = linux.Seccomp.Syscalls.add(Names=["read", "write"], Action="SCMP_ACT_ALLOW")
    call.Args.add(Index=0, Value=1, Op="SCMP_CMP_EQ")
    linux.Seccomp.Syscalls.add(Names=["ptrace"], Action="SCMP_ACT_ERRNO", errnoret=1)
    return spec


def test_full_spec_converts_the_fields_that_matter() -> None:
    config = runc_config(full_spec(), root_path="/guest/rootfs", cgroups_path="/husk/c1")
    assert config["ociVersion"] == "1.0.2"
    assert config["hostname"] == "web"
    assert config["root"] == {"path": "/guest/rootfs", "readonly": True}
    proc = config["process"]
    assert proc["terminal"] is True
    assert proc["consoleSize"] == {"height": 24, "width": 80}
    assert proc["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [10, 20]}
    assert proc["args"] == ["nginx", "-g", "daemon off;"]
    assert proc["env"] == ["PATH=/usr/bin", "A=b"]
    assert proc["cwd"] == "/srv"
    assert proc["capabilities"]["bounding"] == ["CAP_NET_BIND_SERVICE"]
    assert "ambient" not in proc["capabilities"]  # empty: runc reads it as []
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}]
    assert proc["noNewPrivileges"] is True
    assert proc["oomScoreAdj"] == 100
    assert "apparmorProfile" not in proc
    assert config["mounts"] == [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/data",
            "type": "bind",
            "source": "/run/x/data",
            "options": ["rbind", "ro"],
        },
    ]
    assert "hooks" not in config
    assert config["annotations"] == {"io.kubernetes.cri.container-type": "container"}
    linux = config["linux"]
    # The VM's network is shared; host namespace paths mean nothing in the guest.
    assert linux["namespaces"] == [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    assert linux["cgroupsPath"] == "/husk/c1"
    # net.* went with the network namespace: the sandbox sets it on the VM
    assert linux["sysctl"] == {"kernel.shm_rmid_forced": "1"}
    assert linux["maskedPaths"] == ["/proc/kcore"]
    assert linux["readonlyPaths"] == ["/proc/sys"]
    assert "mountLabel" not in linux
    res = linux["resources"]
    assert res["memory"] == {"limit": 256 << 20}
    assert res["cpu"] == {"shares": 512, "quota": 50000, "period": 100000}
    assert res["pids"] == {"limit": 100}
    assert res["devices"] == [
        {"allow": False, "access": "rwm", "type": "a"},
        {"allow": True, "access": "rw", "type": "c", "major": 1},
    ]
    seccomp = linux["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64"]
    # index 0 and valueTwo 0 are left out: runc reads a missing number as 0
    assert seccomp["syscalls"][0]["args"] == [{"value": 1, "op": "SCMP_CMP_EQ"}]
    assert "errnoRet" not in seccomp["syscalls"][0]
    assert seccomp["syscalls"][1]["errnoRet"] == 1


def test_minimal_spec_gets_defaults_and_a_mount_namespace() -> None:
    spec = oci_pb2.Spec()
    spec.Process.Args.append("true")
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/x")
    assert config["process"]["cwd"] == "/"
    assert config["process"]["env"] == [DEFAULT_PATH_ENV]
    assert config["process"]["terminal"] is False
    assert config["linux"]["namespaces"] == [{"type": "mount"}, {"type": "cgroup"}]
    assert "resources" not in config["linux"]
    assert "seccomp" not in config["linux"]


def cgroup_namespaces(spec: oci_pb2.Spec) -> list[dict[str, str]]:
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/x")
    return [ns for ns in config["linux"]["namespaces"] if ns["type"] == "cgroup"]


def test_a_container_from_a_cgroup_v1_host_gets_the_cgroup_namespace_v2_would_give() -> None:
    # containerd on a v1 host asks for no cgroup namespace; the guest is v2, where
    # CRI gives one to every unprivileged container, so its cgroup mount shows its own
    spec = spec_from_json(ctr_run_spec())
    spec.Mounts.add(
        destination="/sys/fs/cgroup",
        source="cgroup",
        type="cgroup",
        options=["nosuid", "noexec", "nodev", "relatime", "ro"],
    )
    assert cgroup_namespaces(spec) == [{"type": "cgroup"}]


def test_a_privileged_container_keeps_the_guests_cgroup_namespace() -> None:
    # containerd's WithPrivileged leaves /sys writable; CRI on v2 gives such a
    # container no cgroup namespace, and runc shows it the whole hierarchy
    spec = spec_from_json(ctr_run_spec())
    for mount in spec.Mounts:
        if mount.type == "sysfs":
            mount.options[:] = ["nosuid", "noexec", "nodev", "rw"]
    assert cgroup_namespaces(spec) == []


def test_a_cgroup_namespace_in_the_spec_is_kept_once_without_its_host_path() -> None:
    spec = spec_from_json(ctr_run_spec())
    spec.Linux.Namespaces.add(Type="cgroup", Path="/proc/7/ns/cgroup")
    assert cgroup_namespaces(spec) == [{"type": "cgroup"}]


def test_every_process_gets_an_oom_score_adj_so_none_inherits_the_agents() -> None:
    # the agent runs with -1000; a container left to inherit it could never be OOM-killed
    spec = oci_pb2.Spec()
    spec.Process.Args.append("true")
    assert runc_config(spec, root_path="/r", cgroups_path="/husk/x")["process"]["oomScoreAdj"] == 0
    assert process_config(oci_pb2.Process(Args=["sh"]))["oomScoreAdj"] == 0
    assert process_config(oci_pb2.Process(Args=["sh"], OOMScoreAdj=-5))["oomScoreAdj"] == -5


def test_terminal_override_and_console_size_only_with_a_terminal() -> None:
    p = oci_pb2.Process(Args=["sh"], Terminal=True)
    p.ConsoleSize.Height, p.ConsoleSize.Width = 10, 20
    assert "consoleSize" not in process_config(p, terminal=False)
    assert process_config(p)["consoleSize"] == {"height": 10, "width": 20}


@pytest.mark.parametrize("spec", [oci_pb2.Spec(), oci_pb2.Spec(Process=oci_pb2.Process())])
def test_a_spec_without_a_program_is_refused(spec: oci_pb2.Spec) -> None:
    with pytest.raises(InvalidArgumentError):
        runc_config(spec, root_path="/r", cgroups_path="/c")


def test_a_mount_without_destination_is_refused() -> None:
    spec = oci_pb2.Spec(Process=oci_pb2.Process(Args=["true"]))
    spec.Mounts.add(source="/x", type="bind")
    with pytest.raises(InvalidArgumentError, match="/x"):
        runc_config(spec, root_path="/r", cgroups_path="/c")


def test_zero_limits_are_left_out_of_updates() -> None:
    res = oci_pb2.LinuxResources()
    res.Memory.Limit = 0
    res.CPU.Cpus = "0-3"
    assert resources_config(res) == {}


def key_paths(value: Any, where: str = "") -> set[str]:
    """Every key path in a JSON value (``linux.resources.devices[].major``)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            paths |= {path} | key_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, f"{where}[]")
    return paths


#: what reaches runc from a spec with every proto field set: a field added to
#: oci.proto shows up here, and passing it to runc is a decision
RUNC_SEES = {
    "ociVersion",
    "hostname",
    "annotations",
    "annotations.k",
    "root",
    "root.path",
    "root.readonly",
    "mounts",
    *(f"mounts[].{k}" for k in ("destination", "source", "type", "options")),
    "process",
    *(
        f"process.{k}"
        for k in (
            "terminal",
            "consoleSize",
            "user",
            "args",
            "env",
            "cwd",
            "capabilities",
            "rlimits",
            "noNewPrivileges",
            "oomScoreAdj",
        )
    ),
    "process.consoleSize.height",
    "process.consoleSize.width",
    *(f"process.user.{k}" for k in ("uid", "gid", "additionalGids", "username")),
    *(
        f"process.capabilities.{k}"
        for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
    ),
    *(f"process.rlimits[].{k}" for k in ("type", "hard", "soft")),
    "linux",
    *(
        f"linux.{k}"
        for k in (
            "uidMappings",
            "gidMappings",
            "sysctl",
            "resources",
            "cgroupsPath",
            "namespaces",
            "devices",
            "seccomp",
            "rootfsPropagation",
            "maskedPaths",
            "readonlyPaths",
        )
    ),
    *(
        f"linux.{m}[].{k}"
        for m in ("uidMappings", "gidMappings")
        for k in ("containerID", "hostID", "size")
    ),
    "linux.sysctl.k",
    "linux.namespaces[].type",
    *(f"linux.devices[].{k}" for k in ("path", "type", "major", "minor", "fileMode", "uid", "gid")),
    *(
        f"linux.resources.{k}"
        for k in ("devices", "memory", "cpu", "pids", "blockIO", "hugepageLimits")
    ),
    *(f"linux.resources.devices[].{k}" for k in ("allow", "type", "major", "minor", "access")),
    *(
        f"linux.resources.memory.{k}"
        for k in (
            "limit",
            "reservation",
            "swap",
            "kernel",
            "kernelTCP",
            "swappiness",
            "disableOOMKiller",
        )
    ),
    *(
        f"linux.resources.cpu.{k}"
        for k in ("shares", "quota", "period", "realtimeRuntime", "realtimePeriod")
    ),
    "linux.resources.pids.limit",
    "linux.resources.blockIO.weight",
    "linux.resources.hugepageLimits[].pageSize",
    "linux.resources.hugepageLimits[].limit",
    *(f"linux.seccomp.{k}" for k in ("defaultAction", "architectures", "flags", "syscalls")),
    *(f"linux.seccomp.syscalls[].{k}" for k in ("names", "action", "errnoRet", "args")),
    *(f"linux.seccomp.syscalls[].args[].{k}" for k in ("index", "value", "valueTwo", "op")),
}


def test_runc_sees_only_what_the_guest_allows_from_a_spec_with_every_field() -> None:
    spec = every_field(oci_pb2.Spec)
    spec.Linux.Resources.Devices[0].Type = "c"  # "a" would drop major/minor
    config = runc_config(spec, root_path="/guest/rootfs", cgroups_path="/husk/c1")
    assert key_paths(config) == RUNC_SEES


def test_a_ctr_run_spec_as_runc_gets_it_in_the_guest() -> None:
    spec = spec_from_json(ctr_run_spec())
    config = runc_config(spec, root_path="/guest/rootfs", cgroups_path="/husk/c1")
    assert config["ociVersion"] == "1.0.2-dev"
    assert config["root"] == {"path": "/guest/rootfs", "readonly": True}
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    assert config["process"]["terminal"] is True
    linux = config["linux"]
    assert linux["namespaces"] == [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    assert linux["cgroupsPath"] == "/husk/c1"
    # containerd's /dev/pts rule is for every minor, and device 5:0 (/dev/tty) stays 0
    rules = linux["resources"]["devices"]
    assert {"allow": True, "type": "c", "major": 136, "access": "rwm"} in rules
    assert {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"} in rules
    assert rules[0] == {"allow": False, "access": "rwm", "type": "a"}
    assert linux["resources"]["cpu"] == {"shares": 512, "quota": 150000, "period": 100000}
    clone3 = [c for c in linux["seccomp"]["syscalls"] if c["names"] == ["clone3"]]
    assert clone3 == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]


def test_a_set_but_empty_capabilities_still_drops_every_capability() -> None:
    p = oci_pb2.Process(Args=["sh"])
    p.Capabilities.SetInParent()
    assert process_config(p)["capabilities"] == {}
    assert "capabilities" not in process_config(oci_pb2.Process(Args=["sh"]))


def test_host_only_resources_are_dropped() -> None:
    res = oci_pb2.LinuxResources()
    res.BlockIO.LeafWeight = 10
    res.BlockIO.WeightDevice.add(Major=8, Minor=0, Weight=100)
    res.BlockIO.ThrottleReadBpsDevice.add(Major=8, Minor=0, Rate=1)
    res.Network.ClassID = 7
    res.CPU.Mems = "0"
    res.Pids.Limit = 0
    assert resources_config(res) == {}
    res.BlockIO.Weight = 500
    assert resources_config(res) == {"blockIO": {"weight": 500}}


def test_a_seccomp_without_default_action_is_left_out() -> None:
    spec = oci_pb2.Spec(Process=oci_pb2.Process(Args=["true"]))
    spec.Linux.Seccomp.Syscalls.add(Names=["read"], Action="SCMP_ACT_ALLOW")
    assert "seccomp" not in runc_config(spec, root_path="/r", cgroups_path="/c")["linux"]


def pod_container_spec() -> oci_pb2.Spec:
    """A CRI container's spec: it joins its pod's ipc and uts (host paths), its own pid."""
    spec = oci_pb2.Spec()
    spec.Process.Args.append("sleep")
    spec.Annotations["io.kubernetes.cri.container-type"] = "container"
    spec.Annotations["io.kubernetes.cri.sandbox-id"] = "pod1"
    for kind in ("pid", "ipc", "uts", "mount", "network"):
        path = f"/proc/4242/ns/{kind}" if kind in ("ipc", "uts", "network") else ""
        spec.Linux.Namespaces.add(Type=kind, Path=path)
    return spec


def test_a_pod_container_joins_its_pods_namespaces_in_the_guest() -> None:
    # under runc it joins the pause container's ipc and uts (pod sysctls, hostname, SysV IPC)
    spec = pod_container_spec()
    assert pod_sandbox_id(spec) == "pod1"
    config = runc_config(
        spec, root_path="/r", cgroups_path="/husk/c", pod_namespaces=pod_namespace_files(77)
    )
    assert config["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc", "path": "/proc/77/ns/ipc"},
        {"type": "uts", "path": "/proc/77/ns/uts"},
        {"type": "mount"},
        {"type": "cgroup"},
    ]


def test_without_its_pod_a_container_gets_new_namespaces() -> None:
    config = runc_config(pod_container_spec(), root_path="/r", cgroups_path="/husk/c")
    assert all("path" not in ns for ns in config["linux"]["namespaces"])


def test_only_cri_containers_belong_to_a_pod() -> None:
    spec = pod_container_spec()
    spec.Annotations["io.kubernetes.cri.container-type"] = "sandbox"
    assert pod_sandbox_id(spec) is None
    assert pod_sandbox_id(oci_pb2.Spec()) is None


def privileged_spec() -> oci_pb2.Spec:
    spec = spec_from_json(ctr_run_spec())
    for mount in spec.Mounts:
        if mount.type == "sysfs":
            mount.options[:] = ["nosuid", "noexec", "nodev", "rw"]
    spec.Linux.Devices.add(Path="/dev/zram0", Type="b", Major=253, Minor=0)
    return spec


def test_a_privileged_container_gets_the_machines_devices_not_the_hosts() -> None:
    guest = [{"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}]
    config = runc_config(
        privileged_spec(), root_path="/r", cgroups_path="/husk/x", machine_devices=lambda: guest
    )
    assert config["linux"]["devices"] == guest


def test_an_unprivileged_containers_devices_are_its_specs() -> None:
    spec = spec_from_json(ctr_run_spec())  # ctr run --device /dev/fuse
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/x", machine_devices=list)
    assert [(d["path"], d["major"]) for d in config["linux"]["devices"]] == [("/dev/fuse", 10)]
