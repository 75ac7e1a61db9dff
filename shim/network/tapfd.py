"""Open a tap that lives in a pod's namespace, for a VMM that runs outside it.

A ``/dev/net/tun`` fd is bound to the namespace of the thread that opened it,
so the fd is opened on a thread inside the pod's namespace (as Kata does) and
handed to the VMM, e.g. with QMP ``getfd`` over SCM_RIGHTS and
``netdev_add tap,fd=<name>``. Holding the fd is what brings the tap's carrier
up; closing every fd takes it down again (the persistent tap stays).
"""

from __future__ import annotations

import fcntl
import os
import struct

from shim.network.errors import NetworkError, NetworkNotFoundError
from shim.network.model import IFNAME_MAX
from shim.network.netns import run_in_netns

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
#: struct ifreq: 16-byte name, then the flags in the union (40 bytes in all)
_IFREQ = struct.Struct("16sH22x")


def tap_flags(queues: int) -> int:
    """``TUNSETIFF`` flags for attaching to a husk tap with ``queues`` queues."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    return flags | IFF_MULTI_QUEUE if queues > 1 else flags


def _attach(tap_name: str, flags: int, netns: str) -> int:
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(tap_name.encode(), flags))
        _, got = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0)))
    except OSError as e:
        os.close(fd)
        reason = e.strerror
        raise NetworkError(f"cannot attach to tap {tap_name} in netns {netns}: {reason}") from None
    if not got & IFF_PERSIST:
        # TUNSETIFF made a fresh, transient tap: ours was not there.
        os.close(fd)
        raise NetworkNotFoundError(f"tap {tap_name} does not exist in netns {netns}")
    return fd


def open_tap_fds(netns_path: str, tap_name: str, queues: int = 1) -> list[int]:
    """``queues`` fds on the existing tap ``tap_name`` in ``netns_path``.

    Flags are ``IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`` (plus ``IFF_MULTI_QUEUE`` for
    more than one queue, which needs a tap created with as many). The fds are
    close-on-exec; the caller owns them. Blocking: call from a worker thread.
    """
    if queues < 1:
        raise ValueError(f"queues must be at least 1, not {queues}")
    if not tap_name or len(tap_name) > IFNAME_MAX:
        raise ValueError(f"not an interface name: {tap_name!r}")
    flags = tap_flags(queues)

    def work() -> list[int]:
        fds: list[int] = []
        try:
            for _ in range(queues):
                fds.append(_attach(tap_name, flags, netns_path))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    return run_in_netns(netns_path, work)
