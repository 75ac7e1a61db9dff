"""QEMU's stderr (its ``-d`` log with ``enable_debug``) stays bounded, however much it writes."""

from __future__ import annotations

import sys
from pathlib import Path

from plugins.qemu.process import QEMU_LOG_CAP, QemuProcess

#: a stand-in for QEMU that logs without end (8 MiB), says its last words and dies
FLOODING_QEMU = (
    "import sys\n"
    "line = b'qemu: guest_errors: invalid access at addr 0xfeb00000, size 1\\n'\n"
    "for _ in range(8 * 1024 * 1024 // len(line)):\n"
    "    sys.stderr.buffer.write(line)\n"
    "sys.stderr.buffer.write(b'qemu-system-x86_64: last words\\n')\n"
    "sys.exit(1)\n"
)


async def test_a_flood_on_qemus_stderr_stays_under_twice_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    process = await QemuProcess.spawn([sys.executable, "-c", FLOODING_QEMU], log=log)
    assert await process.wait() == 1
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("qemu.log*")}
    assert sizes["qemu.log.1"] == QEMU_LOG_CAP and sizes["qemu.log"] <= QEMU_LOG_CAP, sizes
    assert process.stderr_tail(lines=1) == "qemu-system-x86_64: last words"


async def test_qemus_last_words_are_in_the_log_when_it_is_reaped(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    died = "import sys; sys.stderr.write('qemu-system-x86_64: -m 1T: cannot allocate'); exit(1)"
    process = await QemuProcess.spawn([sys.executable, "-c", died], log=log)
    await process.wait()
    assert process.exited_error().stderr_tail == "qemu-system-x86_64: -m 1T: cannot allocate"
    assert not (tmp_path / "qemu.log.1").exists()
