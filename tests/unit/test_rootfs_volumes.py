"""How a volume with host mounts below it is described to the guest."""

from __future__ import annotations

import pytest

from agent_proto import oci_pb2
from shim.sandbox import rootfs


def test_each_mount_below_a_volume_comes_after_the_one_it_is_below(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = "/srv/vol"
    points = [f"{top}/a/deep", f"{top}/b", f"{top}/a", top]
    monkeypatch.setattr(rootfs.mounts, "mounts_under", lambda _, bindable: points)
    monkeypatch.setattr(rootfs.os.path, "realpath", lambda p: p)
    assert rootfs.submounts(top) == ["a", "b", "a/deep"]


def test_a_mount_below_a_read_only_volume_keeps_it_writable() -> None:
    volume = oci_pb2.Mount(
        destination="/data/", source="/srv/vol", type="bind",
        options=["rbind", "rprivate", "ro"],
    )  # fmt: skip
    bind = rootfs._submount_bind(volume, "tmp/cache", "/run/shared/c/mounts/1-vol.0", False)
    assert (bind.destination, bind.source) == ("/data/tmp/cache", "/run/shared/c/mounts/1-vol.0")
    assert list(bind.options) == ["rbind", "rprivate", "rw"]


def test_a_mount_below_a_recursively_read_only_volume_is_read_only() -> None:
    volume = oci_pb2.Mount(destination="/data", source="/srv/vol", type="bind",
                           options=["rbind", "rro"])  # fmt: skip
    bind = rootfs._submount_bind(volume, "tmpfs", "/run/shared/c/mounts/1-vol.0", True)
    assert list(bind.options) == ["rbind", "ro"]
