"""The VM template's RAM: a memfd that is write-sealed once the template is saved.

A clone maps the template's RAM privately (copy-on-write), but QEMU 7.2 opens
``mem-path`` O_RDWR whatever ``share`` says, and a guest that takes over a
clone's QEMU could ``pwrite`` that fd: every later clone would start from
what it wrote. So the RAM is not a file but a memfd sealed with
``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`` after the
template VM has exited: it can still be opened read-write (through
``/proc/<holder>/fd/<n>``) and mapped private and writable, but ``write``,
``pwrite``, ``fallocate``, ``ftruncate`` and shared writable mappings all fail
with EPERM, and no one can take the seals off. QEMU 8.2's ``readonly=on,rom=off``
(where QEMU has it) additionally opens it O_RDONLY.

A memfd lives while an fd or a mapping holds it, so a *holder* process keeps
it: this module run as a script (``python -I -S ram_holder.py <record>
<bytes>``, standard library only). It makes the memfd, says its fd number on
stdout, seals it when told ``seal`` on stdin, and then lives until it is
killed or until ``<record>`` (the template's note of its pid) no longer names
it. It runs in its own session (a shim's exit or its process group's signals
do not reach it), in ``/`` (it keeps no directory busy) and holds no fd but
the memfd. Running clones keep their own mappings when it goes; a template
whose holder is gone is damaged and made again.

The maker's side is ``start`` and ``Holder.seal``; ``problem`` says whether a
recorded holder still holds a sealed memfd of the template's size.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
#: the memfd's name (``/memfd:<name> (deleted)`` in /proc/<pid>/fd)
MEMFD_NAME = "husk-template-ram"
#: how often a sealed holder checks that its record still names it
POLL_SECONDS = 2.0
_START_TIMEOUT = 10.0
_SCRIPT = b"/ram_holder.py"


class HolderError(Exception):
    """The holder could not be started or could not seal its memfd."""


def start_time(pid: int) -> int | None:
    """A running process's start time in clock ticks since boot (None: gone, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class Record:
    """Where a holder's memfd is: what the template dir keeps in ``ram.json``."""

    pid: int
    start: int
    fd: int

    @property
    def memory(self) -> Path:
        """The memfd, for QEMU's ``mem-path`` (opening it opens the memfd itself)."""
        return Path(f"/proc/{self.pid}/fd/{self.fd}")

    def dump(self) -> str:
        """The record's JSON."""
        return json.dumps({"pid": self.pid, "start": self.start, "fd": self.fd})

    @staticmethod
    def load(path: Path) -> Record | None:
        """The record in ``path`` (None: missing or unreadable)."""
        try:
            data = json.loads(path.read_text())
            return Record(pid=int(data["pid"]), start=int(data["start"]), fd=int(data["fd"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool:
        """Whether the recorded holder still runs (the same process, not a reused pid)."""
        return start_time(self.pid) == self.start


def problem(record: Record | None, size: int) -> str | None:
    """Why ``record`` does not hold the template's RAM (None: a sealed memfd of ``size``)."""
    if record is None:
        return "the template's RAM has no holder record"
    if not record.alive():
        return f"the holder of the template's RAM (pid {record.pid}) is gone"
    try:
        target = os.readlink(record.memory)
        fd = os.open(record.memory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"the template's RAM {record.memory} cannot be opened: {e.strerror}"
    try:
        if not target.startswith(f"/memfd:{MEMFD_NAME} "):
            return f"{record.memory} is {target}, not the template's RAM"
        if os.fstat(fd).st_size != size:
            return f"the template's RAM is {os.fstat(fd).st_size} bytes, not {size}"
        if fcntl.fcntl(fd, F_GET_SEALS) & SEALS != SEALS:
            return "the template's RAM is not sealed against writes"
    finally:
        os.close(fd)
    return None


class Holder:
    """A holder this process started and has not sealed yet (the maker's side).

    The holder is not this process's child (it forks away at once), so nothing
    here has to reap it; closing the pipes before ``seal`` makes it exit.
    """

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes], record: Record) -> None:
        self._stdin, self._stdout = stdin, stdout
        self.record = record

    def seal(self) -> None:
        """Seal the memfd (after the template VM has exited: no shared writable mapping)."""
        try:
            self._stdin.write(b"seal\n")
            self._stdin.flush()
            answer = self._stdout.readline().decode(errors="replace").strip()
            self._stdout.read()  # EOF: the holder has let go of its end of the pipes
        except OSError as e:
            raise HolderError(f"the template's RAM holder is gone: {e}") from None
        finally:
            self.close()
        if answer != "sealed":
            raise HolderError(f"cannot seal the template's RAM: {answer or 'its holder exited'}")

    def close(self) -> None:
        """Let go of the holder: unsealed, it exits; sealed, it lives on."""
        for pipe in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                pipe.close()


def start(record_path: Path, size: int) -> Holder:
    """Start a holder of an unsealed memfd of ``size`` bytes for the template ``record_path``.

    The caller writes ``holder.record`` to ``record_path`` (the holder exits,
    once sealed, when that file no longer names it) and then seals or closes it.
    """
    argv = [sys.executable, "-I", "-S", __file__, str(record_path), str(size)]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd="/",
        close_fds=True,
        start_new_session=True,
    )
    assert process.stdin is not None and process.stdout is not None
    holder_pipes = (process.stdin, process.stdout)
    try:
        ready, _, _ = select.select([process.stdout], [], [], _START_TIMEOUT)
        line = process.stdout.readline().decode(errors="replace") if ready else ""
        process.wait(_START_TIMEOUT)  # the first process forks the holder and exits
        pid, fd = (int(word) for word in line.split())
    except (ValueError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()
        for pipe in holder_pipes:
            pipe.close()
        raise HolderError(f"the template's RAM holder did not start: {line.strip()!r}") from None
    begun = start_time(pid)
    if begun is None:
        raise HolderError("the template's RAM holder exited at once")
    return Holder(process.stdin, process.stdout, Record(pid=pid, start=begun, fd=fd))


def holds(pid: int, record_path: Path) -> bool:
    """Whether process ``pid`` is a holder for the template record ``record_path``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) >= 5 and argv[3].endswith(_SCRIPT) and argv[4] == bytes(record_path)


def holders(record_path: Path) -> list[int]:
    """Pids of every holder for ``record_path`` (the recorded one, and any a crash left)."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and holds(int(entry), record_path)
    ]


def orphans() -> list[tuple[int, Path]]:
    """Sealed holders whose record no longer names them (pid, record), for ``husk cleanup``.

    Such a holder exits by itself within ``POLL_SECONDS``; one that has not is
    stuck. An unsealed holder belongs to a template being made (it exits when
    its maker lets go) and is never an orphan.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            sealed = os.readlink(f"/proc/{pid}/fd/0") == os.devnull
        except OSError:
            continue
        if len(argv) < 5 or not argv[3].endswith(_SCRIPT) or not sealed:
            continue
        record_path = Path(os.fsdecode(argv[4]))
        named = Record.load(record_path)
        if named is None or named.pid != pid:
            found.append((pid, record_path))
    return found


# --- the holder process ------------------------------------------------------------


def _named_in(record_path: str) -> bool:
    found = Record.load(Path(record_path))
    return found is not None and found.pid == os.getpid()


def _hold(record_path: str, size: int) -> int:
    if os.fork() > 0:
        os._exit(0)  # the holder is the child: reparented, no one's to reap
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    fd = os.memfd_create(MEMFD_NAME, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    out, into = sys.stdout.buffer, sys.stdin.buffer
    out.write(f"{os.getpid()} {fd}\n".encode())
    out.flush()
    if into.readline().strip() != b"seal":
        return 1  # the maker gave up (or died) before the template was saved
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
    except OSError as e:  # EBUSY: a shared writable mapping still exists
        out.write(f"{e.strerror}\n".encode())
        out.flush()
        return 1
    # keep nothing of the maker's: the pipes become /dev/null before it hears "sealed"
    reply = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    os.write(reply, b"sealed\n")
    os.close(reply)
    while _named_in(record_path):
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(_hold(sys.argv[1], int(sys.argv[2])))
