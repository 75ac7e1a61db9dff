"""The machine's devices, listed as containerd's WithHostDevices lists a host's."""

from __future__ import annotations

import os
from pathlib import Path

from guest.agent.devices import machine_devices


def test_devices_are_listed_with_type_numbers_mode_and_owner() -> None:
    null = next(d for d in machine_devices(Path("/dev")) if d["path"] == "/dev/null")
    assert null == {
        "path": "/dev/null",
        "type": "c",
        "major": 1,
        "minor": 3,
        "fileMode": 0o666,
        "uid": 0,
        "gid": 0,
    }


def test_containerds_skipped_entries_files_and_symlinks_are_left_out(tmp_path: Path) -> None:
    for rel in ("fifo", "console", "pts/0", "shm/x", "mqueue/q", "sub/deeper"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp_path / rel, 0o640)
    (tmp_path / "regular").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    listed = machine_devices(tmp_path)
    assert [d["path"] for d in listed] == [str(tmp_path / "fifo"), str(tmp_path / "sub/deeper")]
    assert listed[0]["type"] == "p" and listed[0]["fileMode"] == 0o640
