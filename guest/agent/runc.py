"""``runc`` (or crun: any runtime with runc's command line) as async calls.

Errors name the binary that ran (``crun create of container ... failed``), so a
message never blames a runtime the guest did not use. Every call passes
``--root`` (so tests never touch the host's runc state) and ``--log`` (runc's
own error messages, kept apart from the container's stderr, which for
``create``/``exec`` is the same pipe as runc's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from common.errors import HuskError, NotFoundError
from guest.agent import command, spec_version
from guest.agent.command import CommandError
from guest.agent.reaper import Reaper

log = logging.getLogger("husk.agent.runc")


class RuncError(HuskError):
    """The OCI runtime failed; the message names it and carries its own error text."""


class Runc:
    """Runs ``runc`` (or a runtime with its command line) with one state root."""

    def __init__(
        self, reaper: Reaper, binary: str, root: Path, *, no_pivot: bool | None = None
    ) -> None:
        self.reaper = reaper
        self.binary = binary
        self.root = root
        # pivot_root(2) refuses to move an initramfs (rootfs cannot be
        # unmounted), so in the guest runc must switch roots with MS_MOVE.
        self.no_pivot = root_is_initramfs() if no_pivot is None else no_pivot
        #: the name errors give the runtime: the binary's, e.g. ``crun``
        self.name = Path(binary).name
        self._version_max: str | None = None
        self._version_lock = trio.Lock()

    def _argv(self, log_file: Path | None, *args: str) -> list[str]:
        argv = [self.binary, "--root", str(self.root)]
        if log_file is not None:
            argv += ["--log", str(log_file), "--log-format", "json"]
        return [*argv, *args]

    async def _run(self, cid: str, *args: str, input: bytes | None = None) -> bytes:
        argv = self._argv(None, *args)
        try:
            done = await command.run(self.reaper, argv, input=input)
        except CommandError as exc:
            text = exc.stderr.strip() or f"exit status {exc.status}"
            if "does not exist" in text or "not found" in text.lower():
                raise NotFoundError(
                    f"container '{cid}' does not exist in {self.name}: {text}"
                ) from None
            raise RuncError(f"{self.name} {args[0]} of container '{cid}' failed: {text}") from None
        return done.stdout

    async def _run_detached(
        self,
        cid: str,
        what: str,
        log_file: Path,
        args: Sequence[str],
        stdio: Sequence[int | None],
        oom_score_adj: int | None = None,
    ) -> None:
        """Run ``create``/``exec``, whose stdio is the container process's stdio."""
        since = log_file.stat().st_size if log_file.exists() else 0
        watch = command.spawn(
            self.reaper,
            self._argv(log_file, *args),
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            oom_score_adj=oom_score_adj,
        )
        status = await watch.wait()
        if status != 0:
            reason = last_error(log_file, since) or f"exit status {status}"
            raise RuncError(f"{self.name} {what} of container '{cid}' failed: {reason}")

    async def create(
        self,
        cid: str,
        bundle: Path,
        pid_file: Path,
        stdio: Sequence[int | None],
        console_socket: str | None = None,
    ) -> None:
        """``runc create``: set up the container, its init process waiting for start."""
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if self.no_pivot:
            args.append("--no-pivot")
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run_detached(cid, "create", bundle / "runc.log", [*args, cid], stdio)

    async def exec(
        self,
        cid: str,
        bundle: Path,
        process_file: Path,
        pid_file: Path,
        stdio: Sequence[int | None],
        console_socket: str | None = None,
        oom_score_adj: int | None = None,
    ) -> None:
        """``runc exec --detach``: start one more process in a running container.

        Neither runc nor crun applies the process's ``oomScoreAdj`` on exec: the
        process inherits theirs, so ``oom_score_adj`` is what they start with.
        """
        args = ["exec", "--detach", "--process", str(process_file), "--pid-file", str(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run_detached(
            cid, "exec", bundle / "runc.log", [*args, cid], stdio, oom_score_adj
        )

    async def start(self, cid: str) -> None:
        """``runc start``: let the init process exec the container's program."""
        await self._run(cid, "start", cid)

    async def kill(self, cid: str, signum: int, *, all_processes: bool = False) -> None:
        """``runc kill``: signal the init process, or every process with ``all_processes``."""
        args = ["kill", "--all"] if all_processes else ["kill"]
        await self._run(cid, *args, cid, str(signum))

    async def pause(self, cid: str) -> None:
        """``runc pause``: freeze every process (cgroup freezer)."""
        await self._run(cid, "pause", cid)

    async def resume(self, cid: str) -> None:
        """``runc resume``: thaw a paused container."""
        await self._run(cid, "resume", cid)

    async def update(self, cid: str, resources: dict[str, object]) -> None:
        """``runc update --resources -``: change the cgroup limits."""
        await self._run(
            cid, "update", "--resources", "-", cid, input=json.dumps(resources).encode()
        )

    async def delete(self, cid: str, *, force: bool = False) -> None:
        """``runc delete``: remove the container's state (``force`` kills it first)."""
        args = ["delete", "--force"] if force else ["delete"]
        await self._run(cid, *args, cid)

    async def state(self, cid: str) -> dict[str, object]:
        """``runc state``: the container's status as runc reports it."""
        data = json.loads(await self._run(cid, "state", cid))
        if not isinstance(data, dict):
            raise RuncError(f"{self.name} state of container '{cid}' returned {data!r}")
        return data

    async def oci_version_max(self) -> str:
        """The newest runtime-spec version the runtime knows, asked once.

        ``<runtime> features`` answers it (``ociVersionMax``); a runtime without
        that command predates runtime-spec 1.1 and gets
        :data:`~guest.agent.spec_version.PRE_FEATURES_VERSION`.
        """
        async with self._version_lock:
            if self._version_max is None:
                self._version_max = await self._ask_version_max()
                log.info("%s knows runtime-spec up to %s", self.name, self._version_max)
            return self._version_max

    async def _ask_version_max(self) -> str:
        try:
            done = await command.run(self.reaper, [self.binary, "features"])
        except CommandError:
            return spec_version.PRE_FEATURES_VERSION
        try:
            answer = json.loads(done.stdout)
            text = str(answer["ociVersionMax"])
            spec_version.parse(text, f"{self.name} features' ociVersionMax")
        except (ValueError, TypeError, KeyError, HuskError) as exc:
            log.warning("%s features answered no usable ociVersionMax (%s)", self.name, exc)
            return spec_version.PRE_FEATURES_VERSION
        return text

    def exists(self, cid: str) -> bool:
        """Whether the runtime has state for ``cid`` under this root.

        runc keeps ``state.json``, crun (the guest's) ``status``: either means
        ``delete`` has something to remove.
        """
        state = self.root / cid
        return (state / "state.json").exists() or (state / "status").exists()


def root_is_initramfs(mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """True when ``/`` is the kernel's initramfs (fs type rootfs or ramfs)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/" and " - " in line:
            fstype = line.split(" - ", 1)[1].split()[0]
            return fstype in ("rootfs", "ramfs")
    return False


def last_error(log_file: Path, since: int = 0) -> str:
    """Return the last error message runc wrote to its JSON log after offset ``since``."""
    try:
        with open(log_file, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    message = ""
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message


def read_pid(pid_file: Path) -> int:
    """Read the pid runc wrote."""
    text = pid_file.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise RuncError(f"the OCI runtime wrote no pid to {pid_file}: {text!r}") from None


def remove_quietly(path: Path) -> None:
    """Unlink ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
