"""Kata's protobuf OCI spec (``oci_pb2.Spec``) → runc's ``config.json``.

proto3 cannot tell an unset number from zero, so zero limits are left out
(runc then applies none). What only makes sense on the host is dropped, because
the container runs inside the VM:

- ``linux.namespaces``: the ``network`` entry (containers share the VM's network,
  which the agent configures) and every ``path`` (host namespace files);
- ``hooks`` (host binaries), ``process.apparmorProfile``/``selinuxLabel``,
  ``linux.mountLabel``/``intelRdt`` (the guest has neither LSM nor RDT);
- ``linux.resources.cpu.cpus``/``mems`` and block-IO device rules (host CPU and
  device numbers mean nothing in the guest);
- ``linux.cgroupsPath``: the agent picks its own (``cgroups_path``).
"""

from __future__ import annotations

from typing import Any

from agent_proto import oci_pb2
from common.errors import InvalidArgumentError

OCI_VERSION = "1.0.2"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Json = dict[str, Any]


def process_config(process: oci_pb2.Process, *, terminal: bool | None = None) -> Json:
    """Convert a process; ``terminal`` overrides ``process.Terminal`` when given."""
    if not process.Args:
        raise InvalidArgumentError("the OCI process has no args")
    env = list(process.Env)
    if not any(e.startswith("PATH=") for e in env):
        env.append(DEFAULT_PATH_ENV)
    out: Json = {
        "terminal": process.Terminal if terminal is None else terminal,
        "user": {"uid": process.User.UID, "gid": process.User.GID},
        "args": list(process.Args),
        "env": env,
        "cwd": process.Cwd or "/",
        "noNewPrivileges": process.NoNewPrivileges,
    }
    if process.User.AdditionalGids:
        out["user"]["additionalGids"] = list(process.User.AdditionalGids)
    if process.HasField("ConsoleSize") and out["terminal"]:
        box = process.ConsoleSize
        if box.Height and box.Width:
            out["consoleSize"] = {"height": box.Height, "width": box.Width}
    if process.HasField("Capabilities"):
        caps = process.Capabilities
        out["capabilities"] = {
            "bounding": list(caps.Bounding),
            "effective": list(caps.Effective),
            "inheritable": list(caps.Inheritable),
            "permitted": list(caps.Permitted),
            "ambient": list(caps.Ambient),
        }
    if process.Rlimits:
        out["rlimits"] = [{"type": r.Type, "hard": r.Hard, "soft": r.Soft} for r in process.Rlimits]
    if process.OOMScoreAdj:
        out["oomScoreAdj"] = process.OOMScoreAdj
    return out


def _mounts(spec: oci_pb2.Spec) -> list[Json]:
    mounts = []
    for m in spec.Mounts:
        if not m.destination:
            raise InvalidArgumentError(f"an OCI mount of {m.source!r} has no destination")
        entry: Json = {"destination": m.destination, "type": m.type or "bind"}
        if m.source:
            entry["source"] = m.source
        if m.options:
            entry["options"] = list(m.options)
        mounts.append(entry)
    return mounts


def _namespaces(linux: oci_pb2.Linux) -> list[Json]:
    kinds = [ns.Type for ns in linux.Namespaces if ns.Type and ns.Type != "network"]
    if "mount" not in kinds:
        # runc cannot set up a rootfs without its own mount namespace.
        kinds.insert(0, "mount")
    return [{"type": kind} for kind in dict.fromkeys(kinds)]


def _device_rule(rule: oci_pb2.LinuxDeviceCgroup) -> Json:
    entry: Json = {"allow": rule.Allow, "access": rule.Access or "rwm"}
    kind = rule.Type or "a"
    entry["type"] = kind
    if kind != "a":
        # proto3 has no "unset": Kata sends -1 for a wildcard.
        if rule.Major >= 0:
            entry["major"] = rule.Major
        if rule.Minor >= 0:
            entry["minor"] = rule.Minor
    return entry


def _nonzero(pairs: dict[str, Any]) -> Json:
    return {k: v for k, v in pairs.items() if v}


def resources_config(res: oci_pb2.LinuxResources) -> Json:
    """Convert cgroup limits (also the body of ``runc update --resources``)."""
    out: Json = {}
    if res.Devices:
        out["devices"] = [_device_rule(d) for d in res.Devices]
    if res.HasField("Memory"):
        m = res.Memory
        memory = _nonzero(
            {
                "limit": m.Limit,
                "reservation": m.Reservation,
                "swap": m.Swap,
                "kernel": m.Kernel,
                "kernelTCP": m.KernelTCP,
                "swappiness": m.Swappiness,
                "disableOOMKiller": m.DisableOOMKiller,
            }
        )
        if memory:
            out["memory"] = memory
    if res.HasField("CPU"):
        c = res.CPU
        cpu = _nonzero(
            {
                "shares": c.Shares,
                "quota": c.Quota,
                "period": c.Period,
                "realtimeRuntime": c.RealtimeRuntime,
                "realtimePeriod": c.RealtimePeriod,
            }
        )
        if cpu:
            out["cpu"] = cpu
    if res.HasField("Pids") and res.Pids.Limit:
        out["pids"] = {"limit": res.Pids.Limit}
    if res.HasField("BlockIO") and res.BlockIO.Weight:
        out["blockIO"] = {"weight": res.BlockIO.Weight}
    if res.HugepageLimits:
        out["hugepageLimits"] = [
            {"pageSize": h.Pagesize, "limit": h.Limit} for h in res.HugepageLimits
        ]
    return out


def _seccomp(sc: oci_pb2.LinuxSeccomp) -> Json:
    syscalls = []
    for call in sc.Syscalls:
        entry: Json = {"names": list(call.Names), "action": call.Action}
        if call.HasField("errnoret"):
            entry["errnoRet"] = call.errnoret
        if call.Args:
            entry["args"] = [
                {"index": a.Index, "value": a.Value, "valueTwo": a.ValueTwo, "op": a.Op}
                for a in call.Args
            ]
        syscalls.append(entry)
    out: Json = {"defaultAction": sc.DefaultAction, "syscalls": syscalls}
    if sc.Architectures:
        out["architectures"] = list(sc.Architectures)
    if sc.Flags:
        out["flags"] = list(sc.Flags)
    return out


def _linux(linux: oci_pb2.Linux, cgroups_path: str) -> Json:
    out: Json = {"namespaces": _namespaces(linux), "cgroupsPath": cgroups_path}
    if linux.UIDMappings:
        out["uidMappings"] = [
            {"containerID": m.ContainerID, "hostID": m.HostID, "size": m.Size}
            for m in linux.UIDMappings
        ]
    if linux.GIDMappings:
        out["gidMappings"] = [
            {"containerID": m.ContainerID, "hostID": m.HostID, "size": m.Size}
            for m in linux.GIDMappings
        ]
    if linux.Sysctl:
        out["sysctl"] = dict(linux.Sysctl)
    if linux.HasField("Resources"):
        resources = resources_config(linux.Resources)
        if resources:
            out["resources"] = resources
    if linux.Devices:
        out["devices"] = [
            {
                "path": d.Path,
                "type": d.Type,
                "major": d.Major,
                "minor": d.Minor,
                "fileMode": d.FileMode,
                "uid": d.UID,
                "gid": d.GID,
            }
            for d in linux.Devices
        ]
    if linux.HasField("Seccomp") and linux.Seccomp.DefaultAction:
        out["seccomp"] = _seccomp(linux.Seccomp)
    if linux.RootfsPropagation:
        out["rootfsPropagation"] = linux.RootfsPropagation
    if linux.MaskedPaths:
        out["maskedPaths"] = list(linux.MaskedPaths)
    if linux.ReadonlyPaths:
        out["readonlyPaths"] = list(linux.ReadonlyPaths)
    return out


def runc_config(
    spec: oci_pb2.Spec, *, root_path: str, cgroups_path: str, terminal: bool | None = None
) -> Json:
    """Return ``config.json`` for runc.

    ``root_path`` is where the agent mounted (or found) the rootfs in the guest;
    ``cgroups_path`` is the cgroup the agent gives the container.
    """
    if not spec.HasField("Process"):
        raise InvalidArgumentError("the OCI spec has no process")
    config: Json = {
        "ociVersion": spec.Version or OCI_VERSION,
        "process": process_config(spec.Process, terminal=terminal),
        "root": {"path": root_path, "readonly": spec.Root.Readonly},
        "mounts": _mounts(spec),
        "linux": _linux(spec.Linux, cgroups_path),
    }
    if spec.Hostname:
        config["hostname"] = spec.Hostname
    if spec.Annotations:
        config["annotations"] = dict(spec.Annotations)
    return config
