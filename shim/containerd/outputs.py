"""Where a process's stdout and stderr go: containerd's stdio URIs, read as its runc shim does.

containerd passes one string per stream. As in containerd-shim-runc-v2
(``pkg/process/io.go``, ``createIO``), the scheme of the *stdout* string decides
for both outputs (stdin is always a FIFO path):

- no scheme, or ``fifo``: paths of FIFOs containerd reads, each opened when the
  process's output starts (:class:`FifoOutputs`);
- ``file:///path``: the shim makes the file's directory (0755) and the file
  (0644) at once and appends stdout and stderr to it (:class:`FileOutputs`);
- ``binary:///path?key=value&...``: the shim starts ``/path key value ...``
  with the read ends of a stdout pipe on fd 3 and a stderr pipe on fd 4, the
  write end of a "ready" pipe on fd 5, and ``CONTAINER_ID`` and
  ``CONTAINER_NAMESPACE`` as its whole environment (``CONTAINER_ID`` is the exec
  id for an exec'd process, as runc's shim passes it); the process is ready once
  it closes fd 5. When the task is deleted the shim closes the pipes, sends
  SIGTERM, waits up to 12 s, SIGKILLs and reaps it (:class:`BinaryOutputs`).

Three differences from containerd 1.6, on purpose: query arguments keep their
order (Go's map order is random); a logger that exits before it is ready, or is
not ready within :data:`LOGGER_READY_TIMEOUT`, fails Create (containerd takes
the EOF for "ready" and waits forever); the logger's stderr goes to the shim's
log (containerd sends it to /dev/null), so an operator sees why a logger failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from shim.containerd.stdio import FifoOutputs, Outputs, Sink, StdioPaths
from shim.errors import FailedPreconditionError, InvalidArgumentError
from shim.resources import PROCESS, Resource, process_start_time

log = logging.getLogger("husk.outputs")

#: containerd's binaryIOProcTermTimeout: how long a logger gets to flush after SIGTERM
LOGGER_TERM_TIMEOUT = 12.0
#: how long Create waits for a logger to close its ready fd
LOGGER_READY_TIMEOUT = 30.0
#: the logger's fds: stdout, stderr, ready
LOGGER_FDS = (3, 4, 5)
#: fds at or above this are free to stage the logger's fds (never one of LOGGER_FDS)
_STAGING_FD = 10
#: PF_EXITING in /proc/<pid>/stat's flags: set before exit closes the process's fds
_PF_EXITING = 0x4


class FileSink:
    """A regular file opened for appending (epoll cannot wait on files: plain writes)."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._fd is None:
                raise trio.ClosedResourceError("the log file is closed")
            try:
                written = os.write(self._fd, view)
            except OSError as e:
                raise trio.BrokenResourceError(f"cannot write the log file: {e}") from e
            view = view[written:]
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        await trio.lowlevel.checkpoint()


class FileOutputs(Outputs):
    """``file://``: both streams appended to one file, as runc's shim does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self, which: str) -> Sink | None:
        return FileSink(self.path)


@dataclass
class Logger:
    """A running ``binary://`` logger process, a child of the shim."""

    pid: int
    pidfd: int
    resource: Resource
    status: int | None = None

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the logger to exit and reap it; whether it did."""
        if self.status is None:
            with trio.move_on_after(timeout):
                await trio.lowlevel.wait_readable(self.pidfd)
            if not self._reap():
                return False
        return True

    def _reap(self) -> bool:
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.status = -1
            return True
        if pid == 0:
            return False
        self.status = os.waitstatus_to_exitcode(wait_status)
        return True

    def exiting(self) -> bool:
        """Whether the logger has begun to exit (or is gone)."""
        if self.status is not None:
            return True
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return True
        fields = stat.rpartition(")")[2].split()
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)

    def signal(self, signum: int) -> None:
        """Signal the logger unless it has been reaped (its pid cannot be reused before)."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def close(self) -> None:
        """Close the pidfd."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


Forget = Callable[[Resource], None]


@dataclass
class BinaryOutputs(Outputs):
    """``binary://``: the pipes to a logger process and the logger itself."""

    logger: Logger
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    forget: Forget
    label: str
    _closed: bool = field(default=False)

    async def open(self, which: str) -> Sink | None:
        return self.stdout if which == "stdout" else self.stderr

    async def aclose(self) -> None:
        """Close the pipes, SIGTERM, wait up to 12 s, SIGKILL, reap (containerd's order)."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            for stream in (self.stdout, self.stderr):
                await trio.aclose_forcefully(stream)
            logger = self.logger
            logger.signal(signal.SIGTERM)
            if not await logger.wait(LOGGER_TERM_TIMEOUT):
                log.warning("%s: logger %d ignored SIGTERM; killing it", self.label, logger.pid)
                logger.signal(signal.SIGKILL)
                await logger.wait(LOGGER_TERM_TIMEOUT)
            logger.close()
            self.forget(logger.resource)
            log.info("%s: logger %d exited with status %s", self.label, logger.pid, logger.status)


@dataclass(frozen=True)
class OutputsRequest:
    """What opening the outputs of one process needs."""

    stdio: StdioPaths
    #: the container id, or the exec id of an exec'd process (the logger's CONTAINER_ID)
    process_id: str
    namespace: str
    #: how messages name the process (``container c1``, ``exec e1 of container c1``)
    label: str
    record: Callable[[Resource], object] = lambda resource: None
    forget: Forget = lambda resource: None


async def open_outputs(request: OutputsRequest) -> Outputs:
    """Parse the stdout URI and set up its destination (a logger is ready on return).

    Raises a one-line ``InvalidArgumentError`` for a URI husk cannot use and
    ``FailedPreconditionError`` for a logger that fails; either leaves nothing.
    """
    stdio = request.stdio
    if not stdio.stdout:
        return FifoOutputs(stdio, request.label)
    uri = urlsplit(stdio.stdout)
    if uri.scheme in ("", "fifo"):
        return FifoOutputs(stdio, request.label)
    path = unquote(uri.path)
    if uri.scheme not in ("file", "binary"):
        raise InvalidArgumentError(
            f"{request.label}: stdout URI {stdio.stdout!r}: scheme {uri.scheme!r} is not "
            "supported; use a FIFO path, file:///path or binary:///path"
        )
    if not path.startswith("/"):
        raise InvalidArgumentError(
            f"{request.label}: stdout URI {stdio.stdout!r} needs an absolute path"
        )
    if uri.scheme == "file":
        return _file_outputs(Path(path), request)
    return await _binary_outputs(path, _query_args(uri.query), request)


def _file_outputs(path: Path, request: OutputsRequest) -> FileOutputs:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_APPEND | os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    except OSError as e:
        raise InvalidArgumentError(
            f"{request.label}: cannot open log file {path}: {e.strerror or e}"
        ) from None
    return FileOutputs(path)


def _query_args(query: str) -> list[str]:
    """``a=1&b&a=2`` → ``["a", "1", "b", ""]``: each key with its first value, in order."""
    args: list[str] = []
    seen: set[str] = set()
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in seen:
            seen.add(key)
            args += [key, value]
    return args


async def _binary_outputs(path: str, args: list[str], request: OutputsRequest) -> BinaryOutputs:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    mine = [out_w, err_w, ready_r]
    try:
        pid = _spawn_logger(path, args, (out_r, err_r, ready_w), request)
    except BaseException:
        for fd in mine:
            os.close(fd)
        raise
    finally:
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
    resource = Resource(
        PROCESS, pid=pid, start=process_start_time(pid), name=f"logger of {request.label}"
    )
    request.record(resource)
    logger = Logger(pid, os.pidfd_open(pid), resource)
    outputs = BinaryOutputs(
        logger,
        trio.lowlevel.FdStream(out_w),
        trio.lowlevel.FdStream(err_w),
        request.forget,
        request.label,
    )
    try:
        await _wait_ready(logger, trio.lowlevel.FdStream(ready_r), path, request.label)
    except BaseException:
        logger.signal(signal.SIGKILL)
        await outputs.aclose()
        raise
    log.info("%s: logger %s ready (pid %d)", request.label, path, pid)
    return outputs


def _spawn_logger(
    path: str, args: list[str], fds: tuple[int, int, int], request: OutputsRequest
) -> int:
    """posix_spawn the logger with ``fds`` as its fds 3, 4, 5 (stdin and stdout /dev/null)."""
    # Stage the fds above the targets first: dup2 onto 3-5 must not clobber a source.
    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _STAGING_FD) for fd in fds]
    try:
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        ]
        actions += [
            (os.POSIX_SPAWN_DUP2, fd, target) for fd, target in zip(staged, LOGGER_FDS, strict=True)
        ]
        env = {"CONTAINER_ID": request.process_id, "CONTAINER_NAMESPACE": request.namespace}
        try:
            return os.posix_spawn(
                path,
                [path, *args],
                env,
                file_actions=actions,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except OSError as e:
            raise InvalidArgumentError(
                f"{request.label}: logger {path} cannot start: {e.strerror or e}"
            ) from None
    finally:
        for fd in staged:
            os.close(fd)


async def _wait_ready(logger: Logger, ready: trio.lowlevel.FdStream, path: str, label: str) -> None:
    async with ready:
        with trio.move_on_after(LOGGER_READY_TIMEOUT) as scope:
            with contextlib.suppress(trio.BrokenResourceError):
                await ready.receive_some(1)
    if scope.cancelled_caught:
        raise FailedPreconditionError(
            f"{label}: logger {path} did not close fd 5 (ready) within "
            f"{LOGGER_READY_TIMEOUT:g} s; killed it"
        )
    if logger.exiting():
        await logger.wait(LOGGER_TERM_TIMEOUT)
        raise FailedPreconditionError(
            f"{label}: logger {path} exited with status {logger.status} before it was ready "
            "(it must keep running and close fd 5 once it reads fds 3 and 4)"
        )
