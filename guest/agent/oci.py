"""Kata's protobuf OCI spec (``oci_pb2.Spec``) → runc's ``config.json``.

The field-by-field mapping is ``agent_proto.oci_json``, the one the shim reads
the bundle with; it leaves out zero numbers, empty strings and empty lists,
which proto3 cannot tell from unset (runc then applies none). This module is the
guest's policy on top. What only makes sense on the host is dropped, because
the container runs inside the VM:

- ``linux.namespaces``: the ``network`` entry (containers share the VM's network,
  which the agent configures) and every ``path`` (host namespace files); a pod
  container's ``ipc``/``uts``/``pid`` path becomes its pod's namespace in the
  guest instead (``pod_namespaces``), as under runc it joins the pause
  container's;
- ``linux.sysctl``'s ``net.*`` keys, which go with the network namespace: they
  are the pod network's, which the sandbox sets on the VM
  (:mod:`guest.agent.sysctls`);
- ``hooks`` (host binaries), ``process.apparmorProfile``/``selinuxLabel``,
  ``linux.mountLabel``/``intelRdt`` (the guest has neither LSM nor RDT);
- ``linux.resources.cpu.cpus``/``mems`` and block-IO device rules (host CPU and
  device numbers mean nothing in the guest), ``blockIO.leafWeight`` (CFQ only)
  and ``resources.network`` (net_cls/net_prio name host interfaces);
- ``linux.cgroupsPath``: the agent picks its own (``cgroups_path``);
- a privileged container's ``linux.devices`` (the host's, as containerd's
  ``WithHostDevices`` listed them): it gets the guest's (:mod:`.devices`);
- the ``solaris`` and ``windows`` sections.

And what runc needs is filled in: ``root.path`` (where the agent put the
rootfs), a ``mount`` namespace, a ``cgroup`` namespace unless the container is
privileged (see :func:`_cgroup_namespace`), ``PATH`` in the environment, ``cwd``,
``user.uid``/``gid``, ``ociVersion``, device rules' ``type``/``access``, and
``process.oomScoreAdj`` (0 unless the spec says otherwise): the agent runs with
-1000 to stay out of the OOM killer's reach, and a process left to inherit
that could never be OOM-killed, so its memory cgroup would loop in OOM forever.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent_proto import oci_pb2
from agent_proto.oci_json import message_to_json
from common.errors import InvalidArgumentError
from guest.agent import devices, spec_version, sysctls

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: a container process's ``oom_score_adj`` when its spec has none (proto3 drops a 0)
DEFAULT_OOM_SCORE_ADJ = 0

Json = dict[str, Any]


def process_config(process: oci_pb2.Process, *, terminal: bool | None = None) -> Json:
    """Convert a process; ``terminal`` overrides ``process.Terminal`` when given."""
    if not process.Args:
        raise InvalidArgumentError("the OCI process has no args")
    return _process(message_to_json(process), terminal)


def resources_config(res: oci_pb2.LinuxResources) -> Json:
    """Convert cgroup limits (also the body of ``runc update --resources``)."""
    return _resources(message_to_json(res))


def runc_config(
    spec: oci_pb2.Spec,
    *,
    root_path: str,
    cgroups_path: str,
    terminal: bool | None = None,
    oci_version: str | None = None,
    pod_namespaces: Mapping[str, str] | None = None,
    machine_devices: Callable[[], list[Json]] = devices.machine_devices,
) -> Json:
    """Return ``config.json`` for runc.

    ``root_path`` is where the agent mounted (or found) the rootfs in the guest;
    ``cgroups_path`` is the cgroup the agent gives the container; ``oci_version``
    the version the runtime is handed (default: the spec's own);
    ``pod_namespaces`` maps a namespace type to the guest file of its pod's
    namespace (:func:`pod_namespace_files`). A privileged container gets
    ``machine_devices()`` in place of the host's devices its spec lists.
    """
    if not spec.HasField("Process"):
        raise InvalidArgumentError("the OCI spec has no process")
    config = message_to_json(spec)
    for key in ("hooks", "solaris", "windows"):
        config.pop(key, None)
    config["ociVersion"] = oci_version or spec.Version or spec_version.DEFAULT_VERSION
    config["process"] = process_config(spec.Process, terminal=terminal)
    config["root"] = {**config.get("root", {}), "path": root_path}
    config["mounts"] = [_mount(m) for m in config.get("mounts", [])]
    config["linux"] = _linux(config.get("linux", {}), cgroups_path, config["mounts"])
    _join_pod_namespaces(config["linux"]["namespaces"], spec, pod_namespaces or {})
    if privileged(config["mounts"]) and config["linux"].get("devices"):
        # containerd listed the host's devices; under runc it gets the machine's
        config["linux"]["devices"] = machine_devices()
    return config


#: the namespaces a pod's containers share with its sandbox (pause) container
POD_SHARED_NAMESPACES = ("ipc", "uts", "pid")
#: CRI's annotations naming a container's kind and its pod (containerd's ``annotations``)
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


def pod_sandbox_id(spec: oci_pb2.Spec) -> str | None:
    """The pod sandbox a CRI container belongs to (None for a sandbox or a non-CRI container)."""
    if spec.Annotations.get(CRI_CONTAINER_TYPE) != "container":
        return None
    return spec.Annotations.get(CRI_SANDBOX_ID) or None


def pod_namespace_files(sandbox_init_pid: int) -> dict[str, str]:
    """The guest's files of the namespaces a pod shares, from its sandbox container's init."""
    return {kind: f"/proc/{sandbox_init_pid}/ns/{kind}" for kind in POD_SHARED_NAMESPACES}


def _join_pod_namespaces(
    namespaces: list[Json], spec: oci_pb2.Spec, pod_namespaces: Mapping[str, str]
) -> None:
    """Point the namespaces the spec joins (a host path) at the pod's in the guest."""
    joined = {ns.Type for ns in spec.Linux.Namespaces if ns.Path}
    for ns in namespaces:
        if ns["type"] in joined and ns["type"] in pod_namespaces:
            ns["path"] = pod_namespaces[ns["type"]]


def _process(process: Json, terminal: bool | None) -> Json:
    for key in ("apparmorProfile", "selinuxLabel"):
        process.pop(key, None)
    process["terminal"] = bool(process.get("terminal")) if terminal is None else terminal
    process.setdefault("oomScoreAdj", DEFAULT_OOM_SCORE_ADJ)
    user = process.setdefault("user", {})
    user.setdefault("uid", 0)
    user.setdefault("gid", 0)
    env = process.setdefault("env", [])
    if not any(e.startswith("PATH=") for e in env):
        env.append(DEFAULT_PATH_ENV)
    process.setdefault("cwd", "/")
    box = process.pop("consoleSize", {})
    if process["terminal"] and box.get("height") and box.get("width"):
        process["consoleSize"] = box
    return process


def _mount(mount: Json) -> Json:
    if not mount.get("destination"):
        raise InvalidArgumentError(
            f"an OCI mount of {mount.get('source', '')!r} has no destination"
        )
    mount.setdefault("type", "bind")
    return mount


def _linux(linux: Json, cgroups_path: str, mounts: list[Json]) -> Json:
    for key in ("mountLabel", "intelRdt"):
        linux.pop(key, None)
    linux["namespaces"] = _namespaces(linux.get("namespaces", []))
    kept = {k: v for k, v in linux.pop("sysctl", {}).items() if not sysctls.is_network(k)}
    if kept:
        linux["sysctl"] = kept
    if _cgroup_namespace(mounts) and {"type": "cgroup"} not in linux["namespaces"]:
        linux["namespaces"].append({"type": "cgroup"})
    linux["cgroupsPath"] = cgroups_path
    resources = _resources(linux.pop("resources", {}))
    if resources:
        linux["resources"] = resources
    if not linux.get("seccomp", {}).get("defaultAction"):
        # runc refuses a filter without one; Kata's proto cannot leave it unset
        linux.pop("seccomp", None)
    return linux


def _namespaces(namespaces: list[Json]) -> list[Json]:
    kinds = [ns["type"] for ns in namespaces if ns.get("type") not in (None, "network")]
    if "mount" not in kinds:
        # runc cannot set up a rootfs without its own mount namespace.
        kinds.insert(0, "mount")
    return [{"type": kind} for kind in dict.fromkeys(kinds)]


def _cgroup_namespace(mounts: list[Json]) -> bool:
    """Whether the container gets its own cgroup namespace: containerd's rule on cgroup v2.

    The guest is always cgroup v2, whatever the host runs. containerd's CRI
    gives every container but a privileged one a cgroup namespace on a v2
    host, and leaves it out on a v1 host for all of them; so a spec from a v1
    host says nothing about what the guest should do. With the namespace a
    ``cgroup`` mount at ``/sys/fs/cgroup`` shows the container's own cgroup
    (``memory.max``, ``cpu.max``, ...) and ``/proc/self/cgroup`` reads ``0::/``,
    as runc shows it on a v2 host. A privileged spec is the one containerd left
    ``/sys`` writable in (``oci.WithPrivileged`` → ``WithWriteableSysfs``); it
    keeps the guest's cgroup namespace, as under runc.
    """
    return not privileged(mounts)


def privileged(mounts: list[Json]) -> bool:
    """Whether containerd made the spec privileged: ``WithPrivileged`` leaves ``/sys`` writable."""
    return any(m.get("type") == "sysfs" and "ro" not in m.get("options", []) for m in mounts)


def _resources(resources: Json) -> Json:
    cpu = resources.get("cpu", {})
    cpu.pop("cpus", None)
    cpu.pop("mems", None)
    if "blockIO" in resources:
        resources["blockIO"] = {k: v for k, v in resources["blockIO"].items() if k == "weight"}
    resources.pop("network", None)
    if "devices" in resources:
        resources["devices"] = [_device_rule(rule) for rule in resources["devices"]]
    # a limit object left with no limit in it says nothing
    return {key: value for key, value in resources.items() if value}


def _device_rule(rule: Json) -> Json:
    rule["allow"] = bool(rule.get("allow"))
    rule.setdefault("access", "rwm")
    if rule.setdefault("type", "a") == "a":
        rule.pop("major", None)
        rule.pop("minor", None)
    return rule
