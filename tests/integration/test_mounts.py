"""common.mounts on the host kernel: what the shim does to the trees it shares into a VM."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import mounts

pytestmark = [pytest.mark.integration]
if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="needs root (mount)"))


@pytest.fixture
def tree() -> Iterator[Path]:
    """``src`` with a tmpfs mounted at ``src/sub``; everything unmounted after."""
    base = Path(tempfile.mkdtemp(prefix="mnt-", dir="/tmp"))
    (base / "src" / "sub").mkdir(parents=True)
    (base / "dst").mkdir()
    mounts.mount("tmpfs", base / "src" / "sub", "tmpfs", ["size=1m"])
    yield base
    for point in sorted(mounts.mounts_under(base), key=len, reverse=True):
        mounts.unmount(point)
    shutil.rmtree(base)


def _write_errno(path: Path) -> int:
    try:
        path.write_text("x")
    except OSError as e:
        return e.errno or 0
    return 0


def test_a_read_only_bind_remount_leaves_the_mounts_below_it_writable(tree: Path) -> None:
    # runc's "ro" on an rbind: the top only (non-recursive read-only)
    mounts.mount(str(tree / "src"), tree / "dst", "", ["rbind"])
    mounts.remount_bind(tree / "dst", ["ro"])
    assert _write_errno(tree / "dst" / "top") == errno.EROFS
    assert _write_errno(tree / "dst" / "sub" / "file") == 0
