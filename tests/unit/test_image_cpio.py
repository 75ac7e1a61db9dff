"""The newc cpio writer: parsed back by our reader and, where installed, by cpio(1)."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess

import pytest

from guest.image import cpio
from guest.image.cpio import Entry
from guest.image.rootfs import Tree

ENTRIES = [
    Entry.directory("dev"),
    Entry.chardev("dev/console", 5, 1),
    Entry.file("init", b"#!/bin/sh\necho husk\n", 0o755),
    Entry.file("etc/empty", b""),
    Entry.file("odd", b"x" * 13),
    Entry.symlink("bin/sh", "/bin/busybox"),
]


def archive(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    size = cpio.write(buf, entries)
    data = buf.getvalue()
    assert size == len(data)
    return data


def test_round_trip() -> None:
    data = archive(ENTRIES)
    assert len(data) % 512 == 0
    back = list(cpio.read(data))
    assert [(e.name, e.mode, e.data, e.rdev) for e in back] == [
        (e.name, e.mode, e.data, e.rdev) for e in ENTRIES
    ]
    assert stat.S_ISCHR(back[1].mode) and back[1].rdev == (5, 1)
    assert stat.S_ISLNK(back[-1].mode) and back[-1].data == b"/bin/busybox"


def test_output_is_deterministic_and_ownerless() -> None:
    assert archive(ENTRIES) == archive(list(ENTRIES))
    for entry in cpio.read(archive(ENTRIES)):
        assert (entry.uid, entry.gid, entry.mtime) == (0, 0, 0)


def test_header_fields_are_aligned() -> None:
    data = archive([Entry.file("a", b"123")])
    assert data[:6] == b"070701"
    # 110-byte header + "a\0" = 112 (aligned), then 3 bytes + 1 pad, then the trailer.
    assert data[116:122] == b"070701"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_gnu_cpio_reads_it() -> None:
    out = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive(ENTRIES), capture_output=True, check=True
    ).stdout.decode()
    lines = out.splitlines()
    assert [ln.split()[-1] for ln in lines[:-1]] == [e.name for e in ENTRIES[:-1]]
    assert lines[-1].endswith("bin/sh -> /bin/busybox")
    assert lines[1].startswith("crw-------")


def test_tree_sorts_and_creates_parents() -> None:
    tree = Tree()
    tree.add(Entry.file("usr/lib/husk/guest/__init__.py", b""))
    tree.add(Entry.file("init", b"", 0o755))
    names = [e.name for e in tree.entries()]
    assert names == ["init", "usr", "usr/lib", "usr/lib/husk", "usr/lib/husk/guest",
                     "usr/lib/husk/guest/__init__.py"]  # fmt: skip
    assert all(stat.S_ISDIR(e.mode) for e in tree.entries()[1:-1])
