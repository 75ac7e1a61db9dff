"""The shared root image in a real VM: mapped read-only through virtio-pmem, read with DAX.

Each test boots QEMU (TCG) as a sandbox does with the default config: the
loader initramfs ``root-initrd.img`` and ``root.img`` behind a virtio-pmem
device, here a copy of the image in the test's directory so that a test that
tries to write it cannot touch the one the rest of the suite boots. The guest
is looked at from inside through its debug console (a root shell beside the agent).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guest.image.manifest import LOADER_NAME, ROOT_IMAGE_NAME, VMLINUX_NAME
from plugins.qemu.driver import QemuHypervisor
from shim.sandbox.factory import DEBUG_CONSOLE_PARAM
from tests.integration.guest_shell import guest_shell
from tests.integration.test_qemu_vm import (
    IMAGE_DIR,
    agent_answers,
    console_log,
    driver,
    image,
    running,
    spec_for,
    workdir,
)

__all__ = ["image", "workdir"]  # fixtures, used by name

pytestmark = pytest.mark.integration


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def booted(workdir: Path, image: tuple[Path, Path]) -> AsyncIterator[QemuHypervisor]:
    """A VM booted from a copy of root.img, as a sandbox boots, with a debug console."""
    root = workdir / ROOT_IMAGE_NAME
    shutil.copyfile(IMAGE_DIR / ROOT_IMAGE_NAME, root)
    hv = driver(image=str(root))
    boot = (IMAGE_DIR / VMLINUX_NAME, IMAGE_DIR / LOADER_NAME)
    spec = spec_for(workdir, boot, debug_console=True, kernel_params=DEBUG_CONSOLE_PARAM)
    async with running(hv, spec, workdir):
        assert await agent_answers(hv, 90)
        yield hv


def _kib(text: str, field: str) -> int:
    found = re.search(rf"{field}=(\d+)", text)
    assert found is not None, text
    return int(found.group(1))


async def test_the_guest_root_is_the_image_mounted_read_only_with_dax(
    booted: QemuHypervisor,
) -> None:
    # the loader says how it mounted the image (its mount is out of the guest's sight)
    console = console_log(booted).read_text(errors="replace")
    pmem = re.search(r"husk-loader: \[[\d.]+\] root image: /dev/pmem0 erofs (\S+)", console)
    assert pmem is not None, console
    assert {"ro", "dax=always"} <= set(pmem.group(1).split(",")), console
    text = await guest_shell(booted, "grep '^overlay / ' /proc/mounts\n")
    assert re.search(r"overlay / overlay \S*lowerdir=/image,upperdir=", text), text


async def test_reading_the_guest_root_puts_no_copy_of_it_in_guest_memory(
    booted: QemuHypervisor,
) -> None:
    """With the whole guest in an initramfs every file is a page of guest memory
    (Cached holds all ~50 MiB of it); from the image, a read is the host's page cache."""
    files = "/usr/bin/python3.11 /usr/sbin/runc /usr/lib/python3.11/lib-dynload/*"
    line = (
        f"echo READ=$(cat {files} | wc -c) "
        f"BEFORE=$(grep '^Cached:' /proc/meminfo | tr -dc 0-9); cat {files} > /dev/null; "
        "echo AFTER=$(grep '^Cached:' /proc/meminfo | tr -dc 0-9)\n"
    )
    text = await guest_shell(booted, line)
    read_kib = _kib(text, "READ") // 1024
    assert read_kib > 8 * 1024, text  # runc alone is ~9 MiB
    # every page the guest caches, of any file: well under what it read
    assert _kib(text, "AFTER") < read_kib // 2, text
    assert _kib(text, "AFTER") - _kib(text, "BEFORE") < 1024, text


async def test_a_guest_cannot_write_the_shared_image(booted: QemuHypervisor) -> None:
    root = Path(booted.settings.image)
    before = _sha256(root), root.stat().st_mtime_ns
    # QEMU maps the file shared and read-only: not a byte of it is writable in its memory
    maps = (Path("/proc") / str(booted.pid) / "maps").read_text().splitlines()
    mapped = [line.split()[1] for line in maps if line.endswith(str(root))]
    assert mapped and all("w" not in perms for perms in mapped), mapped
    line = (
        "dd if=/dev/urandom of=/dev/pmem0 bs=4096 count=256 seek=16 conv=fsync; "
        "mount -o remount,rw /image; echo 3 > /proc/sys/vm/drop_caches; echo DONE\n"
    )
    text = await guest_shell(booted, line)
    assert "DONE" in text, text
    assert (_sha256(root), root.stat().st_mtime_ns) == before
    # and what the guest reads from it is still the image
    text = await guest_shell(booted, "python3 -S -c 'print(\"ALIVE\")'\n")
    assert "ALIVE" in text, text
