"""Kata's protobuf OCI spec → runc config.json."""

from __future__ import annotations

import pytest

from agent_proto import oci_pb2
from guest.agent.oci import DEFAULT_PATH_ENV, process_config, resources_config, runc_config
from shim.errors import InvalidArgumentError


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
    assert proc["capabilities"]["ambient"] == []
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
    assert linux["namespaces"] == [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    assert linux["cgroupsPath"] == "/husk/c1"
    assert linux["sysctl"] == {"net.ipv4.ip_forward": "1"}
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
    assert seccomp["syscalls"][0]["args"] == [
        {"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_EQ"}
    ]
    assert "errnoRet" not in seccomp["syscalls"][0]
    assert seccomp["syscalls"][1]["errnoRet"] == 1


def test_minimal_spec_gets_defaults_and_a_mount_namespace() -> None:
    spec = oci_pb2.Spec()
    spec.Process.Args.append("true")
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/x")
    assert config["process"]["cwd"] == "/"
    assert config["process"]["env"] == [DEFAULT_PATH_ENV]
    assert config["process"]["terminal"] is False
    assert config["linux"]["namespaces"] == [{"type": "mount"}]
    assert "resources" not in config["linux"]
    assert "seccomp" not in config["linux"]


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
