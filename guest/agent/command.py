"""Child processes of the agent: spawned here, waited for by the :class:`Reaper`.

``trio.run_process`` waits for its child itself, which would race the reaper's
``waitpid(-1)``. Here a child is spawned and registered with the reaper in one
step with no checkpoint between, so its status always reaches its watcher.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from common.errors import HuskError
from guest.agent.reaper import ExitWatch, Reaper

SHELL = "/bin/sh"

_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
"""Python ignores these; a child must start with the default disposition."""

_child_oom_score_adj: int | None = None
"""What every child's ``oom_score_adj`` is reset to (None: children inherit the agent's)."""


def reset_children_oom_score_adj(value: int) -> None:
    """Start every child with ``oom_score_adj`` = ``value`` instead of the agent's own.

    The agent protects itself with -1000, which children inherit, and neither
    crun (which skips an ``oomScoreAdj`` of 0, and applies none on exec) nor
    runc (none on exec) undoes that: a container would be unkillable by the OOM
    killer and its memory cgroup would loop in OOM. posix_spawn cannot change
    it, so each child starts as ``sh -c 'echo V > /proc/self/oom_score_adj;
    exec PROGRAM ...'`` (busybox: a millisecond).
    """
    global _child_oom_score_adj
    _child_oom_score_adj = value


def _with_oom_reset(
    argv: Sequence[str], env: Mapping[str, str], value: int | None = None
) -> list[str]:
    value = _child_oom_score_adj if value is None else value
    if value is None:
        return list(argv)
    program = shutil.which(argv[0], path=env.get("PATH"))
    if program is None:
        raise FileNotFoundError(errno.ENOENT, "no such program", argv[0])
    script = f'echo {int(value)} > /proc/self/oom_score_adj && exec "$@"'
    return [SHELL, "-c", script, argv[0], program, *argv[1:]]


class CommandError(HuskError):
    """A helper command (runc, mount) failed; the message quotes its stderr."""

    def __init__(self, argv: Sequence[str], status: int, stderr: str) -> None:
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{' '.join(argv)} failed with exit status {status}{detail}")


@dataclass(frozen=True)
class Completed:
    """The result of a command run to completion."""

    argv: list[str]
    status: int
    stdout: bytes
    stderr: bytes


def spawn(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    env: Mapping[str, str] | None = None,
    oom_score_adj: int | None = None,
) -> ExitWatch:
    """Start ``argv`` with the given fds as its stdio (None: /dev/null) and watch it.

    The caller keeps ownership of the fds it passes and should close its copies
    of the child's ends once this returns. ``oom_score_adj`` is the child's
    (default: what :func:`reset_children_oom_score_adj` set).
    """
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = []
        for target, fd in enumerate((stdin, stdout, stderr)):
            source = devnull if fd is None else fd
            if source == target:
                # dup2 onto itself would keep close-on-exec set.
                actions.append((os.POSIX_SPAWN_DUP2, os.dup(source), target))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, source, target))
        environment = dict(os.environ if env is None else env)
        argv = _with_oom_reset(argv, environment, oom_score_adj)
        pid = os.posix_spawnp(
            argv[0], argv, environment, file_actions=actions, setsigdef=_RESET_SIGNALS
        )
    finally:
        os.close(devnull)
    return reaper.watch(pid)


async def read_all(fd: int) -> bytes:
    """Read ``fd`` to EOF and close it."""
    chunks: list[bytes] = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


async def run(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``argv`` to completion, feeding ``input`` and capturing stdout and stderr.

    Raises :class:`CommandError` on a non-zero status when ``check`` is set, and
    ``FileNotFoundError`` when the program does not exist.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if input is not None else (None, None)
    try:
        watch = spawn(reaper, argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env)
    except BaseException:
        for fd in (out_r, err_r, in_w):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, in_r):
            if fd is not None:
                os.close(fd)
    results: dict[str, bytes] = {}

    async def collect(name: str, fd: int) -> None:
        results[name] = await read_all(fd)

    async def feed(fd: int, data: bytes) -> None:
        async with trio.lowlevel.FdStream(fd) as stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, "stdout", out_r)
        nursery.start_soon(collect, "stderr", err_r)
        if in_w is not None and input is not None:
            nursery.start_soon(feed, in_w, input)
        status = await watch.wait()
    done = Completed(list(argv), status, results["stdout"], results["stderr"])
    if check and status != 0:
        raise CommandError(argv, status, done.stderr.decode(errors="replace"))
    return done
