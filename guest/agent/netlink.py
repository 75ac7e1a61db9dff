"""Just enough rtnetlink for what busybox ``ip`` cannot do: static neighbours.

busybox's ``ip neigh`` only shows and flushes, so ``AddARPNeighbors`` sends
``RTM_NEWNEIGH`` itself: a ``nlmsghdr``, an ``ndmsg`` and the ``NDA_DST`` /
``NDA_LLADDR`` attributes, packed with :mod:`struct` (the guest has no netlink
library, and needs none for one message). The encoders are pure functions
with their own tests; :func:`replace_neighbor` is the one call that talks to
the kernel.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

RTM_NEWNEIGH = 28
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NDA_DST = 1
NDA_LLADDR = 2
NUD_PERMANENT = 0x80

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")  # len, type
_NLMSGERR = struct.Struct("=i")


def _align(length: int) -> int:
    return (length + 3) & ~3


def attribute(kind: int, payload: bytes) -> bytes:
    """One ``rtattr``: header, payload, padding to 4 bytes."""
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def mac_bytes(mac: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` as 6 bytes; ValueError for anything else."""
    octets = mac.strip().split(":")
    if len(octets) != 6 or not all(len(o) == 2 for o in octets):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(o, 16) for o in octets)


def new_neighbor(
    ifindex: int,
    address: str,
    lladdr: str = "",
    *,
    state: int = NUD_PERMANENT,
    flags: int = 0,
    seq: int = 1,
) -> bytes:
    """``RTM_NEWNEIGH`` with create|replace|ack: ``ip neigh replace ADDR lladdr MAC dev``."""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    body = _NDMSG.pack(family, 0, 0, ifindex, state or NUD_PERMANENT, flags, 0)
    body += attribute(NDA_DST, ip.packed)
    if lladdr:
        body += attribute(NDA_LLADDR, mac_bytes(lladdr))
    header_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWNEIGH, header_flags, seq, 0) + body


def ack_error(reply: bytes, seq: int) -> int:
    """The errno of the kernel's ``NLMSG_ERROR`` answer to ``seq`` (0: done); -1 if none."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(reply):
        length, kind, _, got_seq, _ = _NLMSGHDR.unpack_from(reply, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR and got_seq == seq:
            (error,) = _NLMSGERR.unpack_from(reply, offset + _NLMSGHDR.size)
            return -int(error)
        offset += _align(length)
    return -1


def replace_neighbor(
    device: str, address: str, lladdr: str = "", *, state: int = NUD_PERMANENT, flags: int = 0
) -> None:
    """Add or replace a neighbour entry; OSError (with errno) when the kernel refuses."""
    ifindex = socket.if_nametoindex(device)
    seq = 1
    message = new_neighbor(ifindex, address, lladdr, state=state, flags=flags, seq=seq)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        sock.send(message)
        while True:
            error = ack_error(sock.recv(65536), seq)
            if error == 0:
                return
            if error > 0:
                raise OSError(error, os.strerror(error))
            # not our answer (another message on the socket): keep reading
