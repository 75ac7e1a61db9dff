"""The agent tells runc to avoid pivot_root when the guest runs from an initramfs."""

from __future__ import annotations

from pathlib import Path

from guest.agent.reaper import Reaper
from guest.agent.runc import Runc, root_is_initramfs

INITRAMFS = "1 1 0:2 / / rw - rootfs rootfs rw,size=245032k\n22 1 0:20 / /proc rw - proc proc rw\n"
DISK = (
    "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:21 / /proc rw - proc proc rw\n"
)


def test_initramfs_root_is_detected(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(INITRAMFS)
    assert root_is_initramfs(info)


def test_disk_root_is_not_initramfs(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(DISK)
    assert not root_is_initramfs(info)


def test_unreadable_mountinfo_means_pivot_root_is_used(tmp_path: Path) -> None:
    assert not root_is_initramfs(tmp_path / "absent")


def test_state_of_runc_or_crun_means_there_is_something_to_delete(tmp_path: Path) -> None:
    runtime = Runc(Reaper(), "crun", tmp_path, no_pivot=False)
    (tmp_path / "runc-made").mkdir()
    (tmp_path / "runc-made" / "state.json").write_text("{}")
    (tmp_path / "crun-made").mkdir()
    (tmp_path / "crun-made" / "status").write_text("created")
    assert runtime.exists("runc-made") and runtime.exists("crun-made")
    assert not runtime.exists("neither")
