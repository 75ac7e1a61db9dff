"""Run a function with one thread inside a network namespace.

``setns(CLONE_NEWNET)`` changes the namespace of the calling thread only, so a
short-lived thread can enter the pod's namespace, do its netlink and tun work
there (a netlink socket and a ``/dev/net/tun`` fd stay bound to the namespace
they were opened in), and exit, leaving every other thread, including trio's,
where it was. pyroute2's own ``netns=`` support forks a helper process
instead, which a multi-threaded shim had better avoid.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from shim.network.errors import NetworkError, NetworkNotFoundError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def open_netns(path: str) -> int:
    """An fd of the namespace at ``path``; a one-line error if there is none."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkNotFoundError(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NetworkError(f"cannot open network namespace {path}: {e.strerror}") from None


def _enter(fd: int, path: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            raise NetworkError(f"{path} is not a network namespace")
        raise NetworkError(f"cannot enter network namespace {path}: {os.strerror(err)}")


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call ``fn()`` on a fresh thread inside the namespace at ``path``; blocks.

    Exceptions from ``fn`` are re-raised in the caller.
    """
    fd = open_netns(path)
    outcome: list[tuple[bool, object]] = []

    def body() -> None:
        try:
            _enter(fd, path)
            outcome.append((True, fn()))
        except BaseException as e:
            outcome.append((False, e))

    try:
        thread = threading.Thread(target=body, name=f"husk-netns {path}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]
