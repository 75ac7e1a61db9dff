"""Build the guest image and boot it in QEMU (TCG): /init must reach the agent step.

The image is built into ``$HUSK_IMAGE_DIR`` (default /var/lib/husk/images) and reused
across runs (the build is skipped when its inputs are unchanged).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from guest.image import (
    DEFAULT_IMAGE_DIR,
    INITRD_NAME,
    KERNEL_NAME,
    build_image,
    recipe,
)
from guest.image.manifest import VMLINUX_NAME
from plugins.qemu.cmdline import BASE_KERNEL_PARAMS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian host)"),
]

MARKER = re.compile(r"husk-init: \[[\d.]+\] (agent started|agent missing)")
BOOT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def image_dir() -> Path:
    out = Path(os.environ.get("HUSK_IMAGE_DIR", str(DEFAULT_IMAGE_DIR)))
    started = time.monotonic()
    manifest = build_image(out)
    size = manifest.artefacts[INITRD_NAME].size / 2**20
    print(f"image: {time.monotonic() - started:.1f} s, initrd {size:.1f} MiB")
    return out


def boot(kernel: Path, initrd: Path, workdir: Path) -> tuple[float, str]:
    """Boot until the init's agent marker; returns (seconds from QEMU start, console log)."""
    log = workdir / "console.log"
    sock = workdir / "agent.sock"
    log.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-no-user-config",
        "-nographic", "-m", "512", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", BASE_KERNEL_PARAMS,
        "-serial", f"file:{log}",
        "-device", "virtio-rng-pci",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.channel.0",
    ]  # fmt: skip
    started = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        while time.monotonic() - started < BOOT_TIMEOUT:
            text = log.read_text(errors="replace") if log.exists() else ""
            if MARKER.search(text):
                elapsed = time.monotonic() - started
                time.sleep(0.2)  # let the lines after the marker reach the log
                return elapsed, log.read_text(errors="replace")
            if qemu.poll() is not None:
                out = qemu.stdout.read().decode(errors="replace") if qemu.stdout else ""
                pytest.fail(f"QEMU exited ({qemu.returncode}) before the marker: {out}\n{text}")
            time.sleep(0.01)
        pytest.fail(f"no init marker within {BOOT_TIMEOUT} s:\n{text}")
    finally:
        qemu.kill()
        qemu.wait()
        sock.unlink(missing_ok=True)


@pytest.mark.parametrize("kernel_name", [VMLINUX_NAME, KERNEL_NAME])
def test_boot_reaches_agent(image_dir: Path, kernel_name: str, tmp_path: Path) -> None:
    kernel = image_dir / kernel_name
    if not kernel.exists():
        pytest.skip(f"image has no {kernel_name}")
    times = []
    for _ in range(3):
        elapsed, console = boot(kernel, image_dir / INITRD_NAME, tmp_path)
        times.append(elapsed)
        modules = re.search(r"husk-init: \[[\d.]+\] modules loaded: (\d+)(.*)", console)
        assert modules, console
        # the device drivers (and their dependencies); filesystems load on first mount
        loaded = int(modules.group(1))
        assert loaded >= len(recipe.KERNEL_MODULES) and "failed" not in modules.group(2), console
        assert re.search(r"virtio-ports: .*agent\.channel\.0", console), console
    print(f"{kernel_name}: QEMU start -> init marker: median {statistics.median(times):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
