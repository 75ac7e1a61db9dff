"""The shared root image: the guest tree as a read-only erofs file, and the loader that mounts it.

Every sandbox VM maps ``root.img`` through a virtio-pmem device backed by the
file; the guest mounts it (erofs: read-only by design) with DAX, so a page of
it the guest reads is the host's page cache of the file, once for every VM,
never copied into guest memory. ``root-initrd.img`` is the small initramfs
that gets there: busybox (static), the modules the pmem device and erofs
need, and ``guest/init/loader.sh``.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from guest.image import packages, recipe
from guest.image.cpio import Entry
from guest.image.errors import ImageBuildError
from guest.image.rootfs import Tree

#: the image's UUID (fixed: the same tree gives the same bytes)
IMAGE_UUID = "6875736b-726f-6f74-2d69-6d6167650001"
#: the pmem device's size is a whole number of these (the guest maps it in 2 MiB steps)
ALIGN = 2 * 1024 * 1024
#: what the loader runs: each a busybox applet
LOADER_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "sleep", "switch_root", "poweroff")


def materialize(tree: Tree, root: Path) -> None:
    """Write ``tree`` under ``root`` as files (owners are set by mkfs.erofs --all-root).

    Device nodes are left out: the loader moves its devtmpfs onto the image's /dev.
    """
    for entry in tree.entries():
        path = root / entry.name
        perm = stat.S_IMODE(entry.mode)
        if stat.S_ISDIR(entry.mode):
            path.mkdir(exist_ok=True)
        elif stat.S_ISLNK(entry.mode):
            os.symlink(entry.data.decode(), path)
            continue
        elif stat.S_ISREG(entry.mode):
            path.write_bytes(entry.data)
        elif stat.S_ISCHR(entry.mode):
            continue
        else:
            raise ImageBuildError(f"root image: unsupported entry type of /{entry.name}")
        os.chmod(path, perm)


def write_root_image(run: packages.Runner, tree: Tree, dest: Path) -> int:
    """Write ``tree`` as an erofs image at ``dest``; returns its size.

    Uncompressed, no tail data in inodes (``noinline_data``): the guest's erofs
    maps only such files with DAX. Owners root, times 0, a fixed UUID: the same
    tree gives the same image. The size is padded to 2 MiB, the step in which
    the guest maps the pmem device.
    """
    staging = dest.with_name(dest.name + ".tree")
    staging.mkdir()
    try:
        materialize(tree, staging)
        run(
            [
                packages.tool_path("mkfs.erofs") or "mkfs.erofs", "--quiet", "--all-root",
                "-T0", f"-U{IMAGE_UUID}", "-Enoinline_data", str(dest), str(staging),
            ],
            dest.parent,
        )  # fmt: skip
    finally:
        shutil.rmtree(staging)
    size = -(-dest.stat().st_size // ALIGN) * ALIGN
    with dest.open("r+b") as f:
        f.truncate(size)
    return size


def loader_tree(
    staging: Path, moddir: Path, kernel_version: str, modules: Iterable[str], init_script: bytes
) -> Tree:
    """The loader initramfs: busybox, the root's modules (``modules`` in load order), /init."""
    tree = Tree()
    for d in ("dev", "proc", "sys", "image", "rw", "root"):
        tree.mkdir(d)
    tree.add(Entry.chardev("dev/console", 5, 1))
    tree.add_host_path(staging / "bin/busybox", "bin/busybox")
    for applet in LOADER_APPLETS:
        tree.add(Entry.symlink(f"bin/{applet}", "busybox"))
    base = f"lib/modules/{kernel_version}"
    listed = list(modules)
    for rel in listed:
        tree.add_host_path(moddir / rel, f"{base}/{rel}")
    tree.add(Entry.file(recipe.LOADER_MODULE_LIST, ("\n".join(listed) + "\n").encode()))
    tree.add(Entry.file("init", init_script, 0o755))
    return tree
