"""What a QEMU binary offers that husk's command line depends on, asked once per binary.

Debian 12's QEMU is 7.2; newer QEMUs add options husk prefers where they
exist. The answer comes from QEMU itself (``-object <type>,help`` lists a
backend's properties), not from its version string, and is kept per binary
(path, inode, mtime) for the life of the process.
"""

from __future__ import annotations

import os
import subprocess

import trio

#: (path, inode, mtime) → the properties of memory-backend-file
_BACKEND_FILE: dict[tuple[str, int, int], frozenset[str]] = {}
_PROBE_TIMEOUT = 10.0


def parse_properties(help_text: str) -> frozenset[str]:
    """The property names of ``-object <type>,help`` output (``  name=<type> - doc``)."""
    names = set()
    for line in help_text.splitlines():
        name, sep, _ = line.strip().partition("=")
        if sep and name and " " not in name:
            names.add(name)
    return frozenset(names)


async def memory_backend_file_properties(binary: str) -> frozenset[str]:
    """What ``-object memory-backend-file`` accepts (empty when QEMU cannot be asked)."""
    try:
        st = os.stat(binary)
    except OSError:
        return frozenset()
    key = (binary, st.st_ino, st.st_mtime_ns)
    known = _BACKEND_FILE.get(key)
    if known is not None:
        return known
    argv = [binary, "-nodefaults", "-machine", "none", "-object", "memory-backend-file,help"]
    try:
        with trio.fail_after(_PROBE_TIMEOUT):
            result = await trio.run_process(
                argv,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except (OSError, trio.TooSlowError):
        return frozenset()
    found = parse_properties(result.stdout.decode(errors="replace"))
    _BACKEND_FILE[key] = found
    return found


async def maps_file_ram_readonly(binary: str) -> bool:
    """Whether guest RAM can be a private, writable mapping of a file QEMU opens read-only.

    That is ``memory-backend-file,readonly=on,rom=off`` (QEMU 8.2). Before it,
    ``readonly=on`` maps the RAM read-only (the guest cannot run: its RAM is
    a ROM), and without it QEMU opens ``mem-path`` O_RDWR whatever ``share``
    says (QEMU 7.2's ``file_ram_open``; 8.1 falls back to O_RDONLY only when
    O_RDWR is refused, which root's QEMU never is).
    """
    return "rom" in await memory_backend_file_properties(binary)
