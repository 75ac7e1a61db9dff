"""Getting a container's root filesystem (and host bind mounts) into the guest.

- An overlay (or bind) from containerd's snapshotter is mounted on the host
  at ``<mounts>/<cid>/rootfs``, below the sandbox's host-only ``mounts/``, and
  appears in its read-only view ``shared/`` (see :mod:`shim.sandbox.share`);
  the VMM exports ``shared/`` (9p tag ``kataShared``) and the agent mounts it
  at ``/run/kata-containers/shared/containers``, so the guest sees the rootfs
  at ``/run/kata-containers/shared/containers/<cid>/rootfs``, as in Kata.
- A rootfs on a block device (devmapper and friends) is hot-added as a disk;
  the agent mounts it, found by its virtio serial, at
  ``/run/kata-containers/<cid>/rootfs``.
- A bundle without rootfs mounts (``ctr run --rootfs``) shares its ``root.path``.

Each host mount is recorded in the sandbox state before it is made, is
``nosuid,nodev`` on the host, and is made and undone with fd-based walks that
never follow a symlink (:mod:`shim.sandbox.safepath`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_proto import agent_pb2, mount_pb2, oci_pb2
from common import mounts
from shim import identifiers
from shim.errors import InvalidArgumentError
from shim.hypervisor import BlockDevice, SharedFsDevice
from shim.resources import MOUNT, Resource
from shim.sandbox import safepath
from shim.sandbox.devices import DeviceManager
from shim.sandbox.state import SandboxState

SHARED_TAG = "kataShared"
GUEST_SHARED = "/run/kata-containers/shared/containers"
GUEST_CONTAINERS = "/run/kata-containers"
_SHARED_TYPES = {"overlay", "bind", "rbind"}
_BLOCK_FSTYPES = {"ext4", "ext3", "ext2", "xfs", "btrfs"}


@dataclass
class SharedRootfs:
    """How one container's rootfs and bind mounts reach the guest."""

    #: the spec's ``root.path`` for the agent: relative means below its shared dir
    guest_path: str
    storages: list[agent_pb2.Storage] = field(default_factory=list)
    mounts: list[Resource] = field(default_factory=list)
    device: BlockDevice | None = None


def shared_fs_device(kind: str, directory: Path) -> SharedFsDevice | None:
    """The VM's share of the sandbox's shared dir, for a ``shared_fs`` kind ("none": None)."""
    if kind == "none":
        return None
    return SharedFsDevice(id="shared", tag=SHARED_TAG, path=directory, kind=kind)


def shared_storage(device: SharedFsDevice | None) -> agent_pb2.Storage | None:
    """The sandbox-wide share ``CreateSandbox`` mounts from the VM's shared device.

    None without a device (block rootfs only, or an agent that sees the shared
    dir directly).
    """
    if device is None:
        return None
    if device.kind == "9p":
        return agent_pb2.Storage(
            driver="9p",
            source=device.tag,
            fstype="9p",
            options=["trans=virtio", "version=9p2000.L", "msize=262144", "nodev"],
            mount_point=GUEST_SHARED,
        )
    return agent_pb2.Storage(
        driver="virtio-fs", source=device.tag, fstype="virtiofs", mount_point=GUEST_SHARED
    )


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


async def attach(
    container_id: str,
    bundle: str,
    spec: dict[str, Any],
    rootfs: Sequence[mount_pb2.Mount],
    state: SandboxState,
    devices: DeviceManager,
) -> SharedRootfs:
    """Make the rootfs available in the guest; returns where and with which storages."""
    identifiers.validate("container", container_id)
    if len(rootfs) > 1:
        raise InvalidArgumentError(
            f"container {container_id}: {len(rootfs)} rootfs mounts; husk takes one "
            "(an overlay, a bind or a block device)"
        )
    host = f"{container_id}/rootfs"
    # relative: the agent resolves it below its shared mount, <shared>/<cid>/rootfs
    shared = SharedRootfs(guest_path="rootfs")
    if not rootfs:
        root = (spec.get("root") or {}).get("path", "rootfs")
        source = root if os.path.isabs(root) else os.path.join(bundle, root)
        _mount(shared, state, host, source, "bind", ["rbind"])
        return shared
    m = rootfs[0]
    if m.type in _SHARED_TYPES:
        _mount(shared, state, host, m.source, m.type, list(m.options))
        return shared
    if _is_block(m.source) or m.type in _BLOCK_FSTYPES:
        device = devices.block(Path(m.source), readonly="ro" in m.options)
        await devices.attach(device)
        shared.device = device
        shared.guest_path = f"{GUEST_CONTAINERS}/{container_id}/rootfs"
        shared.storages.append(
            agent_pb2.Storage(
                driver="blk",
                source=device.serial,
                fstype=m.type,
                options=list(m.options),
                mount_point=shared.guest_path,
            )
        )
        return shared
    raise InvalidArgumentError(
        f"container {container_id}: rootfs mount type {m.type!r} from {m.source} is not "
        "supported (overlay, bind or a block device)"
    )


def share_bind_mounts(
    container_id: str, spec: oci_pb2.Spec, shared: SharedRootfs, state: SandboxState
) -> None:
    """Share host bind-mount sources into the guest and point the spec at them.

    A volume is bound without the mounts below it, and each host mount below it
    gets a share entry of its own and a spec mount over its place in the
    volume, right after the volume's. So the share never holds a copy of a
    host mount at the host's own path: its owner can detach the mount and
    remove the tree while the container runs (EBUSY otherwise, since the copy
    would sit on that directory in the host's mount namespace). It also gives
    each runtime-spec flavour of read-only as runc does: "ro" is the volume's
    top alone (the mounts below keep their own flags), "rro" every entry.
    """
    expanded: list[oci_pb2.Mount] = []
    for i, m in enumerate(spec.Mounts):
        expanded.append(m)
        if m.type != "bind" and "bind" not in m.options and "rbind" not in m.options:
            continue
        if not os.path.exists(m.source):
            continue
        name = f"{i}-{os.path.basename(m.source.rstrip('/')) or 'root'}"
        host = f"{container_id}/mounts/{name}"
        recursive = "rro" in m.options
        read_only = "ro" in m.options or recursive
        below = submounts(m.source) if "rbind" in m.options or recursive else []
        _mount(shared, state, host, m.source, "bind", ["ro"] if read_only else [])
        guest = f"{GUEST_SHARED}/{container_id}/mounts/{name}"
        for j, rel in enumerate(below):
            sub_host = f"{container_id}/mounts/{name}.{j}"
            _mount(shared, state, sub_host, os.path.join(m.source, rel), "bind",
                   ["ro"] if recursive else [])  # fmt: skip
            expanded.append(_submount_bind(m, rel, f"{GUEST_SHARED}/{sub_host}", recursive))
        m.source = guest
        if recursive:
            # every entry is read-only on the host and the guest sees each as a
            # 9p directory with nothing mounted below it: a plain "ro" there is
            # recursive (and needs no rro from the guest's runtime)
            kept = ["ro" if o == "rro" else o for o in m.options]
            del m.options[:]
            m.options.extend(kept)
    if len(expanded) != len(spec.Mounts):
        ordered = [oci_pb2.Mount() for _ in expanded]
        for copy, m in zip(ordered, expanded, strict=True):
            copy.CopyFrom(m)
        del spec.Mounts[:]
        spec.Mounts.extend(ordered)


def submounts(top: str) -> list[str]:
    """The host mount points below ``top`` (not ``top`` itself) that a recursive bind
    would take (not the unbindable ones), relative to it, each after the one it is
    below."""
    real = os.path.realpath(top)
    points = [p for p in mounts.mounts_under(real, bindable=True) if p != real]
    return sorted((os.path.relpath(p, real) for p in points), key=lambda r: (r.count("/"), r))


def _submount_bind(volume: oci_pb2.Mount, rel: str, source: str, read_only: bool) -> oci_pb2.Mount:
    options = [o for o in volume.options if o not in ("ro", "rro", "rw", "bind", "rbind")]
    return oci_pb2.Mount(
        destination=f"{volume.destination.rstrip('/')}/{rel}",
        source=source,
        type="bind",
        options=["rbind", *options, "ro" if read_only else "rw"],
    )


def _mount(
    shared: SharedRootfs,
    state: SandboxState,
    rel: str,
    source: str,
    fstype: str,
    options: list[str],
) -> None:
    """Mount ``source`` at ``<mounts>/<rel>``, ``nosuid,nodev``, never through a symlink
    (a bind takes the mounts below ``source`` only when ``options`` say ``rbind``)."""
    root = state.mounts_dir
    parent = rel.rpartition("/")[0]
    safepath.make_dirs(root, parent)
    if os.path.isdir(source) or fstype == "overlay":
        safepath.make_dirs(root, rel)
    else:
        safepath.make_file(root, rel)
    resource = state.record(Resource(kind=MOUNT, path=str(root / rel)))
    shared.mounts.append(resource)
    bind = "rbind" if fstype == "rbind" or "rbind" in options else "bind"
    options = [o for o in options if o not in ("suid", "dev", "bind", "rbind")]
    options += ["nosuid", "nodev"]
    if fstype not in ("bind", "rbind"):
        with safepath.mount_target(root, rel) as target:
            mounts.mount(fstype, target, fstype, options)
        return
    with safepath.mount_target(root, rel) as target:
        mounts.mount(source, target, "", [bind])
    # a bind takes its flags in a remount, on the new mount: open the path anew
    # (the fd above names the directory under it)
    with safepath.mount_target(root, rel) as target:
        mounts.remount_bind(target, options)


async def detach(
    container_id: str, shared: SharedRootfs, state: SandboxState, devices: DeviceManager
) -> None:
    """Undo ``attach``: unmount, remove the directories, hot-remove the disk."""
    for resource in reversed(shared.mounts):
        mounts.unmount(resource.path)
        state.forget(resource)
    shared.mounts.clear()
    if shared.device is not None:
        await devices.detach(shared.device.id)
        shared.device = None
    if mounts.mounts_under(state.mounts_dir / container_id):
        return  # an unmount failed: leave the tree for cleanup rather than walk a mount
    safepath.remove_tree(state.mounts_dir, container_id)
