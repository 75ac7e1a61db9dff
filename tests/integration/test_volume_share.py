"""Host volumes shared into a sandbox, and common.mounts under them, on the host
kernel (root, no VM).

What the host owner of a volume may do while a container uses it — detach a
mount below it and remove the tree, as kubelet and critest do — must not fail
because husk's share holds a copy of that mount at the same place.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_proto import oci_pb2
from common import mounts
from shim.sandbox import rootfs, share
from shim.sandbox.state import SandboxState

pytestmark = [pytest.mark.integration]
if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="needs root (mount)"))

CID = "c1"


@pytest.fixture
def volume() -> Iterator[Path]:
    """A host directory with a tmpfs at ``tmpfs`` (critest's createHostPathForRROMount)."""
    base = Path(tempfile.mkdtemp(prefix="vol-", dir="/tmp"))
    (base / "tmpfs").mkdir()
    (base / "top").write_text("top")
    mounts.mount("none", base / "tmpfs", "tmpfs", ["size=1m"])
    yield base
    for point in mounts.mounts_under(base):
        mounts.unmount(point)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def state() -> Iterator[SandboxState]:
    root = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
    sandbox = SandboxState.create(root, "sb")
    share.prepare(sandbox)
    yield sandbox
    for point in mounts.mounts_under(root):
        mounts.unmount(point)
    shutil.rmtree(root, ignore_errors=True)


def _share(state: SandboxState, volume: Path, options: list[str]) -> oci_pb2.Spec:
    spec = oci_pb2.Spec()
    spec.Mounts.append(oci_pb2.Mount(destination="/mnt", source=str(volume), type="bind",
                                     options=["rbind", "rprivate", *options]))  # fmt: skip
    rootfs.share_bind_mounts(CID, spec, rootfs.SharedRootfs(guest_path="rootfs"), state)
    return spec


def _host_path(state: SandboxState, spec_source: str) -> Path:
    """Where a spec mount's source (a guest path in the share) is on the host."""
    return state.mounts_dir / os.path.relpath(spec_source, rootfs.GUEST_SHARED)


def _write_errno(path: Path) -> int:
    try:
        path.write_text("x")
    except OSError as e:
        return e.errno or 0
    return 0


@pytest.mark.parametrize("options", [[], ["ro"], ["rro"]], ids=["rw", "ro", "rro"])
def test_the_owner_can_detach_a_mount_below_a_shared_volume_and_remove_the_tree(
    state: SandboxState, volume: Path, options: list[str]
) -> None:
    _share(state, volume, options)
    mounts.unmount(volume / "tmpfs")  # MNT_DETACH, as critest does
    shutil.rmtree(volume)  # EBUSY while the share kept the tmpfs at volume/tmpfs
    assert not volume.exists()


def test_a_non_recursively_read_only_volume_keeps_the_mount_below_it_writable(
    state: SandboxState, volume: Path
) -> None:
    spec = _share(state, volume, ["ro"])
    top, below = spec.Mounts
    assert below.destination == "/mnt/tmpfs" and "rw" in below.options
    assert _write_errno(_host_path(state, top.source) / "new") == errno.EROFS
    assert _write_errno(_host_path(state, below.source) / "file") == 0
    assert (volume / "tmpfs" / "file").read_text() == "x"


def test_a_recursively_read_only_volume_is_read_only_below_too(
    state: SandboxState, volume: Path
) -> None:
    spec = _share(state, volume, ["rro"])
    top, below = spec.Mounts
    assert "ro" in top.options and "rro" not in top.options
    assert below.destination == "/mnt/tmpfs" and "ro" in below.options
    assert _write_errno(_host_path(state, top.source) / "new") == errno.EROFS
    assert _write_errno(_host_path(state, below.source) / "file") == errno.EROFS
    assert _write_errno(volume / "tmpfs" / "file") == 0  # the host's own stays writable


def test_an_unbindable_mount_below_a_volume_is_left_out_as_a_recursive_bind_would(
    state: SandboxState, volume: Path
) -> None:
    (volume / "tmpfs" / "inner").mkdir()
    mounts.mount("none", volume / "tmpfs" / "inner", "tmpfs", ["size=1m"])
    subprocess.run(["mount", "--make-unbindable", str(volume / "tmpfs")], check=True)
    spec = _share(state, volume, [])
    assert [m.destination for m in spec.Mounts] == ["/mnt"]


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """An empty directory to bind onto; everything below it unmounted after."""
    path = Path(tempfile.mkdtemp(prefix="dst-", dir="/tmp"))
    yield path
    for point in mounts.mounts_under(path):
        mounts.unmount(point)
    shutil.rmtree(path, ignore_errors=True)


def test_a_read_only_bind_remount_leaves_the_mounts_below_it_writable(
    volume: Path, elsewhere: Path
) -> None:
    # runc's "ro" on an rbind: the top only (non-recursive read-only)
    mounts.mount(str(volume), elsewhere, "", ["rbind"])
    mounts.remount_bind(elsewhere, ["ro"])
    assert _write_errno(elsewhere / "top") == errno.EROFS
    assert _write_errno(elsewhere / "tmpfs" / "file") == 0
