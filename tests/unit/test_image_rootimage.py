"""The shared root image (erofs, written by mkfs.erofs) and its loader initramfs."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from guest.image import recipe, rootimage
from guest.image.cpio import Entry
from guest.image.packages import subprocess_runner, tool_path
from guest.image.rootfs import Tree
from guest.image.rootimage import ALIGN, LOADER_APPLETS, loader_tree, write_root_image


def sample_tree() -> Tree:
    tree = Tree()
    tree.add(Entry.file("init", b"#!/bin/sh\n", 0o755))
    tree.add(Entry.file("usr/lib/big", bytes(range(256)) * 40000))  # ~10 MiB
    tree.add(Entry.file("etc/secret", b"x", 0o600))
    tree.add(Entry.symlink("bin/sh", "/bin/busybox"))
    tree.add(Entry.chardev("dev/console", 5, 1))
    tree.mkdir("tmp", 0o1777)
    return tree


@pytest.fixture
def erofs_tools() -> None:
    if tool_path("mkfs.erofs") is None or tool_path("fsck.erofs") is None:
        pytest.fail("erofs-utils is not installed (tests/apt-packages.txt lists it)")


def test_the_root_image_holds_the_tree_and_is_padded_to_2_mib(
    tmp_path: Path, erofs_tools: None
) -> None:
    dest = tmp_path / "root.img"
    size = write_root_image(subprocess_runner(), sample_tree(), dest)
    assert size == dest.stat().st_size and size % ALIGN == 0
    assert not (tmp_path / "root.img.tree").exists()  # the staging tree is gone
    out = tmp_path / "extracted"
    subprocess.run(
        [str(tool_path("fsck.erofs")), f"--extract={out}", str(dest)],
        check=True,
        capture_output=True,
    )
    assert (out / "usr/lib/big").read_bytes() == bytes(range(256)) * 40000
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "etc/secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    # device nodes stay out: the loader moves its devtmpfs onto /dev
    assert not (out / "dev/console").exists()


def test_the_same_tree_gives_the_same_image(tmp_path: Path, erofs_tools: None) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write_root_image(subprocess_runner(), sample_tree(), a)
    write_root_image(subprocess_runner(), sample_tree(), b)
    assert a.read_bytes() == b.read_bytes()


def test_files_are_owned_by_root_whoever_owns_the_staging_tree(
    tmp_path: Path, erofs_tools: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def materialize_as_a_user(tree: Tree, root: Path) -> None:
        real_materialize(tree, root)
        if os.geteuid() == 0:  # a user's build: the staged files are the user's
            for path in (root, *root.rglob("*")):
                os.chown(path, 1000, 1000, follow_symlinks=False)

    real_materialize = rootimage.materialize
    monkeypatch.setattr(rootimage, "materialize", materialize_as_a_user)
    dest = tmp_path / "root.img"
    write_root_image(subprocess_runner(), sample_tree(), dest)
    dumped = subprocess.run(
        [str(tool_path("dump.erofs")), "--path=/etc/secret", str(dest)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert re.search(r"Uid: 0\s+Gid: 0\s+Access: 0600", dumped.stdout), dumped.stdout


def test_the_loader_holds_busybox_its_applets_the_modules_in_order_and_init(
    tmp_path: Path,
) -> None:
    staging, moddir = tmp_path / "staging", tmp_path / "modules"
    (staging / "bin").mkdir(parents=True)
    (staging / "bin/busybox").write_bytes(b"\x7fELF busybox")
    modules = ["kernel/lib/libcrc32c.ko", "kernel/fs/erofs/erofs.ko"]
    for rel in modules:
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(rel.encode())
    tree = loader_tree(staging, moddir, "6.1.0-1-amd64", modules, b"#!/bin/sh\n")
    init = tree.get("init")
    assert init is not None and stat.S_IMODE(init.mode) == 0o755
    for applet in LOADER_APPLETS:
        link = tree.get(f"bin/{applet}")
        assert link is not None and link.data == b"busybox"
    listed = tree.get(recipe.LOADER_MODULE_LIST)
    assert listed is not None and listed.data.decode().split() == modules
    erofs = tree.get("lib/modules/6.1.0-1-amd64/kernel/fs/erofs/erofs.ko")
    assert erofs is not None and erofs.data == b"kernel/fs/erofs/erofs.ko"
    assert len([p for p in tree.paths() if p.endswith(".ko")]) == 2  # nothing else
