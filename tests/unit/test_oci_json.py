"""The one OCI spec mapping, JSON ⇄ Kata's protobuf, both sides of the VM boundary use."""

from __future__ import annotations

from typing import Any

import pytest

from agent_proto import oci_pb2
from agent_proto.oci_json import json_name, message_from_json, message_to_json
from common.errors import InvalidArgumentError
from tests.unit.oci_samples import ctr_run_spec, every_field

#: every field of oci.proto → its key in runtime-spec's specs-go/config.go struct tags
#: (Solaris and Windows are placeholders in Kata's proto; ``dummy`` is in no spec)
SPEC_JSON_KEYS: dict[str, dict[str, str]] = {
    "Spec": {
        "Version": "ociVersion",
        "Process": "process",
        "Root": "root",
        "Hostname": "hostname",
        "Mounts": "mounts",
        "Hooks": "hooks",
        "Annotations": "annotations",
        "Linux": "linux",
        "Solaris": "solaris",
        "Windows": "windows",
    },
    "Process": {
        "Terminal": "terminal",
        "ConsoleSize": "consoleSize",
        "User": "user",
        "Args": "args",
        "Env": "env",
        "Cwd": "cwd",
        "Capabilities": "capabilities",
        "Rlimits": "rlimits",
        "NoNewPrivileges": "noNewPrivileges",
        "ApparmorProfile": "apparmorProfile",
        "OOMScoreAdj": "oomScoreAdj",
        "SelinuxLabel": "selinuxLabel",
    },
    "Box": {"Height": "height", "Width": "width"},
    "User": {
        "UID": "uid",
        "GID": "gid",
        "AdditionalGids": "additionalGids",
        "Username": "username",
    },
    "LinuxCapabilities": {
        "Bounding": "bounding",
        "Effective": "effective",
        "Inheritable": "inheritable",
        "Permitted": "permitted",
        "Ambient": "ambient",
    },
    "POSIXRlimit": {"Type": "type", "Hard": "hard", "Soft": "soft"},
    "Mount": {
        "destination": "destination",
        "source": "source",
        "type": "type",
        "options": "options",
    },
    "Root": {"Path": "path", "Readonly": "readonly"},
    "Hooks": {
        "Prestart": "prestart",
        "Poststart": "poststart",
        "Poststop": "poststop",
        "CreateRuntime": "createRuntime",
        "CreateContainer": "createContainer",
        "StartContainer": "startContainer",
    },
    "Hook": {"Path": "path", "Args": "args", "Env": "env", "Timeout": "timeout"},
    "Linux": {
        "UIDMappings": "uidMappings",
        "GIDMappings": "gidMappings",
        "Sysctl": "sysctl",
        "Resources": "resources",
        "CgroupsPath": "cgroupsPath",
        "Namespaces": "namespaces",
        "Devices": "devices",
        "Seccomp": "seccomp",
        "RootfsPropagation": "rootfsPropagation",
        "MaskedPaths": "maskedPaths",
        "ReadonlyPaths": "readonlyPaths",
        "MountLabel": "mountLabel",
        "IntelRdt": "intelRdt",
    },
    "Windows": {"dummy": "dummy"},
    "Solaris": {"dummy": "dummy"},
    "LinuxIDMapping": {"HostID": "hostID", "ContainerID": "containerID", "Size": "size"},
    "LinuxNamespace": {"Type": "type", "Path": "path"},
    "LinuxDevice": {
        "Path": "path",
        "Type": "type",
        "Major": "major",
        "Minor": "minor",
        "FileMode": "fileMode",
        "UID": "uid",
        "GID": "gid",
    },
    "LinuxResources": {
        "Devices": "devices",
        "Memory": "memory",
        "CPU": "cpu",
        "Pids": "pids",
        "BlockIO": "blockIO",
        "HugepageLimits": "hugepageLimits",
        "Network": "network",
    },
    "LinuxMemory": {
        "Limit": "limit",
        "Reservation": "reservation",
        "Swap": "swap",
        "Kernel": "kernel",
        "KernelTCP": "kernelTCP",
        "Swappiness": "swappiness",
        "DisableOOMKiller": "disableOOMKiller",
    },
    "LinuxCPU": {
        "Shares": "shares",
        "Quota": "quota",
        "Period": "period",
        "RealtimeRuntime": "realtimeRuntime",
        "RealtimePeriod": "realtimePeriod",
        "Cpus": "cpus",
        "Mems": "mems",
    },
    "LinuxWeightDevice": {
        "Major": "major",
        "Minor": "minor",
        "Weight": "weight",
        "LeafWeight": "leafWeight",
    },
    "LinuxThrottleDevice": {"Major": "major", "Minor": "minor", "Rate": "rate"},
    "LinuxBlockIO": {
        "Weight": "weight",
        "LeafWeight": "leafWeight",
        "WeightDevice": "weightDevice",
        "ThrottleReadBpsDevice": "throttleReadBpsDevice",
        "ThrottleWriteBpsDevice": "throttleWriteBpsDevice",
        "ThrottleReadIOPSDevice": "throttleReadIOPSDevice",
        "ThrottleWriteIOPSDevice": "throttleWriteIOPSDevice",
    },
    "LinuxPids": {"Limit": "limit"},
    "LinuxDeviceCgroup": {
        "Allow": "allow",
        "Type": "type",
        "Major": "major",
        "Minor": "minor",
        "Access": "access",
    },
    "LinuxNetwork": {"ClassID": "classID", "Priorities": "priorities"},
    "LinuxHugepageLimit": {"Pagesize": "pageSize", "Limit": "limit"},
    "LinuxInterfacePriority": {"Name": "name", "Priority": "priority"},
    "LinuxSeccomp": {
        "DefaultAction": "defaultAction",
        "Architectures": "architectures",
        "Flags": "flags",
        "Syscalls": "syscalls",
    },
    "LinuxSeccompArg": {"Index": "index", "Value": "value", "ValueTwo": "valueTwo", "Op": "op"},
    "LinuxSyscall": {"Names": "names", "Action": "action", "errnoret": "errnoRet", "Args": "args"},
    "LinuxIntelRdt": {"L3CacheSchema": "l3CacheSchema"},
}


def test_every_proto_field_has_its_runtime_spec_json_key() -> None:
    messages = oci_pb2.DESCRIPTOR.message_types_by_name
    assert set(messages) == set(SPEC_JSON_KEYS)
    for name, message in messages.items():
        derived = {f.name: json_name(f) for f in message.fields}
        assert derived == SPEC_JSON_KEYS[name], name


def test_a_real_containerd_spec_survives_the_round_trip() -> None:
    spec = ctr_run_spec()
    message = message_from_json(oci_pb2.Spec, spec, "spec")
    # The device-cgroup wildcard (no "minor") must not come back as device 0.
    pts = [d for d in message.Linux.Resources.Devices if d.Major == 136]
    assert [d.Minor for d in pts] == [-1]
    assert message_to_json(message) == proto3_view(spec)


def test_every_field_survives_the_round_trip() -> None:
    message = every_field(oci_pb2.Spec)
    assert message_from_json(oci_pb2.Spec, message_to_json(message), "spec") == message


def test_zero_values_are_left_out_but_set_messages_stay() -> None:
    process = oci_pb2.Process(Args=["sh"], NoNewPrivileges=False, Cwd="")
    process.Capabilities.SetInParent()  # set, every list empty: no capabilities at all
    process.Rlimits.add(Type="RLIMIT_CORE")
    assert message_to_json(process) == {
        "args": ["sh"],
        "capabilities": {},
        "rlimits": [{"type": "RLIMIT_CORE"}],
    }


def test_special_cases_of_presence() -> None:
    syscall = oci_pb2.LinuxSyscall(Names=["x"], Action="SCMP_ACT_ERRNO", errnoret=0)
    assert message_to_json(syscall)["errnoRet"] == 0
    assert "errnoRet" not in message_to_json(oci_pb2.LinuxSyscall(Names=["x"]))
    rule = oci_pb2.LinuxDeviceCgroup(Allow=True, Type="c", Major=5, Minor=0, Access="rw")
    assert message_to_json(rule) == {
        "allow": True,
        "type": "c",
        "major": 5,
        "minor": 0,
        "access": "rw",
    }
    rule.Major = rule.Minor = -1
    assert message_to_json(rule) == {"allow": True, "type": "c", "access": "rw"}


def test_keys_match_case_insensitively_and_unknown_keys_are_dropped() -> None:
    message = message_from_json(
        oci_pb2.LinuxHugepageLimit, {"PageSize": "2MB", "limit": 1, "rsvd": True}, "h"
    )
    assert message == oci_pb2.LinuxHugepageLimit(Pagesize="2MB", Limit=1)


def test_an_instance_is_filled_in_place() -> None:
    process = oci_pb2.Process(Cwd="/keep")
    assert message_from_json(process, {"args": ["a"]}, "process") is process
    assert process.Cwd == "/keep" and list(process.Args) == ["a"]


def test_negative_unsigned_values_mean_unlimited() -> None:
    memory = message_from_json(oci_pb2.LinuxMemory, {"swap": -1, "swappiness": -1}, "m")
    assert (memory.Swap, memory.Swappiness) == (-1, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "OCI spec: spec must be an object, not list"),
        ({"process": "sh"}, "OCI spec: spec.process must be an object, not str"),
        ({"process": {"args": "sh"}}, "OCI spec: spec.process.args must be a list"),
        ({"process": {"user": {"uid": "0"}}}, "spec.process.user.uid must be an integer, not '0'"),
        ({"process": {"user": {"uid": 1 << 40}}}, "spec.process.user.uid is out of range"),
        ({"annotations": ["a"]}, "OCI spec: spec.annotations must be an object"),
        (
            {"process": {"user": {"additionalGids": [1.5]}}},
            "spec.process.user.additionalGids[0] must be an integer",
        ),
    ],
)
def test_bad_values_are_invalid_arguments_naming_the_key(data: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^[^\n]*$") as err:
        message_from_json(oci_pb2.Spec, data, "spec")
    assert message in str(err.value)


def proto3_view(value: Any, where: str = "") -> Any:
    """What proto3 can carry of a JSON value: zero scalars and empty lists fall away.

    Maps (``annotations``, ``sysctl``) are kept whole; so are device-cgroup
    ``major``/``minor``, where -1, not 0, stands for "absent".
    """
    kept = {"linux.resources.devices[].major", "linux.resources.devices[].minor"}
    if isinstance(value, dict) and where not in ("annotations", "linux.sysctl"):
        paths = {k: f"{where}.{k}" if where else k for k in value}
        return {
            k: proto3_view(v, paths[k])
            for k, v in value.items()
            if paths[k] in kept or isinstance(v, dict) or v not in (0, "", False, [])
        }
    if isinstance(value, list):
        return [proto3_view(v, f"{where}[]") for v in value]
    return value
