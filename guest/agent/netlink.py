"""Netlink framing and one blocking socket: what every rtnetlink request shares.

The guest carries no netlink library (pyroute2 needs asyncio and
multiprocessing, which the trimmed guest stdlib leaves out, and costs seconds
to import under TCG), and the agent needs only a handful of messages, so they
are packed here with :mod:`struct`. A message is an ``nlmsghdr`` followed by a
family header and ``rtattr`` attributes, each padded to 4 bytes::

    nlmsghdr (len, type, flags, seq, pid) │ family header │ rtattr │ rtattr …

The packers and parsers are pure functions over bytes with their own tests;
:class:`Socket` is the one place that talks to the kernel. Its calls block, but
a NETLINK_ROUTE request is answered before ``send`` returns, so they are fast
enough to make from the agent's trio loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # ROOT | MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
# in the header of an NLMSG_ERROR (an ack), the same bits say what follows it
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

#: ``rta_type`` bits that are flags, not part of the attribute's number
NLA_TYPE_MASK = ~0xC000 & 0xFFFF

RECV_SIZE = 65536
"""Larger than any dump datagram: the kernel caps those at 32 KiB."""

DUMP_RETRIES = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused a request: ``errno`` and its text, plus the kernel's
    own explanation (extended ack) when it gave one."""


def align(length: int) -> int:
    """``length`` rounded up to netlink's 4-byte alignment."""
    return (length + 3) & ~3


def attribute(kind: int, payload: bytes) -> bytes:
    """One ``rtattr``: header, payload, padding to 4 bytes."""
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (align(length) - length)


def attributes(data: bytes | memoryview, offset: int = 0) -> dict[int, bytes]:
    """The ``rtattr``s from ``offset`` to the end of ``data``, by number (last one wins)."""
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break  # truncated: keep what was whole
        found[kind & NLA_TYPE_MASK] = bytes(data[offset + _RTATTR.size : offset + length])
        offset += align(length)
    return found


def cstring(payload: bytes) -> str:
    """A NUL-terminated attribute (a link name, a kernel message) as text."""
    return payload.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Request:
    """A message to send, without the ``seq`` the socket gives it."""

    kind: int
    flags: int
    body: bytes

    def pack(self, seq: int) -> bytes:
        """The whole message: ``nlmsghdr`` (pid 0: the kernel) and body."""
        length = _NLMSGHDR.size + len(self.body)
        return _NLMSGHDR.pack(length, self.kind, self.flags, seq, 0) + self.body


@dataclass(frozen=True)
class Message:
    """One message of a reply: its header fields and the bytes after the header."""

    kind: int
    flags: int
    seq: int
    body: bytes


def messages(buffer: bytes) -> Iterator[Message]:
    """The messages in one datagram; a truncated tail is dropped."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(buffer):
        length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(buffer, offset)
        if length < _NLMSGHDR.size or offset + length > len(buffer):
            return
        yield Message(kind, flags, seq, buffer[offset + _NLMSGHDR.size : offset + length])
        offset += align(length)


def error_of(message: Message) -> tuple[int, str]:
    """(errno, kernel's explanation) of an ``NLMSG_ERROR`` or ``NLMSG_DONE``; 0: success."""
    if len(message.body) < _ERRNO.size:
        if message.kind == NLMSG_DONE:
            return 0, ""
        return errno.EPROTO, "truncated netlink error message"
    (error,) = _ERRNO.unpack_from(message.body)
    text = ""
    if message.flags & NLM_F_ACK_TLVS:
        tlvs = _ERRNO.size
        if message.kind == NLMSG_ERROR and len(message.body) >= tlvs + _NLMSGHDR.size:
            # an ack echoes the request's header (capped) or the whole request
            (echoed,) = struct.unpack_from("=I", message.body, tlvs)
            tlvs += _NLMSGHDR.size if message.flags & NLM_F_CAPPED else align(echoed)
        text = cstring(attributes(message.body, tlvs).get(NLMSGERR_ATTR_MSG, b""))
    return -error, text


def raise_for(error: int, text: str) -> None:
    """NetlinkError for a non-zero errno, with the kernel's text when it sent one."""
    if error:
        detail = f"{os.strerror(error)} ({text})" if text else os.strerror(error)
        raise NetlinkError(error, detail)


class Socket:
    """A NETLINK_ROUTE socket in the caller's network namespace.

    One request at a time: :meth:`call` sends it and reads until its answer is
    complete (the ack, or the end of a dump). Use it as a context manager.
    ``sock`` is for tests: an object with ``send``, ``recv`` and ``close``.
    """

    def __init__(self, timeout: float = 5.0, *, sock: socket.socket | None = None) -> None:
        self._seq = 0
        if sock is not None:
            self._sock = sock
            return
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self._sock.settimeout(timeout)
            self._sock.bind((0, 0))
            for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                # an older kernel: errors come without the kernel's explanation
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(SOL_NETLINK, option, 1)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> Socket:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def call(self, request: Request) -> list[Message]:
        """Send ``request`` (a dump, or a request with NLM_F_ACK); the dump's
        messages, or [] once the request is acked.

        A dump the kernel marks interrupted (the table changed under it) is
        retried. NetlinkError when the kernel refuses.
        """
        for _ in range(DUMP_RETRIES):
            replies, interrupted = self._exchange(request)
            if not interrupted:
                return replies
        raise NetlinkError(errno.EINTR, "netlink dump kept being interrupted by changes")

    def _exchange(self, request: Request) -> tuple[list[Message], bool]:
        self._seq += 1
        seq = self._seq
        self._sock.send(request.pack(seq))
        replies: list[Message] = []
        interrupted = False
        while True:
            for message in messages(self._sock.recv(RECV_SIZE)):
                if message.seq != seq:
                    continue  # a late answer to an earlier request
                if message.kind == NLMSG_ERROR:
                    raise_for(*error_of(message))
                    return replies, interrupted
                if message.kind == NLMSG_DONE:
                    raise_for(*error_of(message))  # a dump's end carries an errno too
                    return replies, interrupted
                interrupted |= bool(message.flags & NLM_F_DUMP_INTR)
                replies.append(message)
