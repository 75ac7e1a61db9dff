"""How a read-only volume with host mounts below it is described to the guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_proto import oci_pb2
from shim.sandbox import rootfs


def test_only_the_outermost_mounts_below_a_volume_count(monkeypatch: pytest.MonkeyPatch) -> None:
    top = Path("/s/mounts/c/mounts/1-vol")
    points = [f"{top}/a/deep", f"{top}/a", f"{top}/b", str(top)]
    monkeypatch.setattr(rootfs.mounts, "mounts_under", lambda _: points)
    assert rootfs.writable_submounts(top) == ["a", "b"]


def test_a_mount_below_a_read_only_volume_gets_a_writable_bind_of_its_own() -> None:
    volume = oci_pb2.Mount(
        destination="/data/", source="/run/shared/c/mounts/1-vol", type="bind",
        options=["rbind", "rprivate", "ro"],
    )  # fmt: skip
    bind = rootfs._writable_bind(volume, "tmp/cache")
    assert (bind.destination, bind.source) == (
        "/data/tmp/cache",
        "/run/shared/c/mounts/1-vol/tmp/cache",
    )
    assert list(bind.options) == ["rbind", "rprivate", "rw"]
