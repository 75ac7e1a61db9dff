"""The handshake that proves a connection to the guest comes from its own shim.

A vsock port answers every host process (each one is CID 2, and a guest's CID
shows in ``ps``), so the agent and its debug console trust no connection on
vsock (or, in tests, on the agent's unix socket) until the peer proves it
holds the sandbox's secret: 32 random bytes the shim wrote to a 0600 file in
the sandbox's 0700 state dir and QEMU hands the guest as a ``fw_cfg`` file.
The guest speaks first, before any ttrpc or console frame::

    guest → host   CHALLENGE  b"HUSK" | version | purpose | nonce (32 fresh random bytes)
    host → guest   RESPONSE   b"HUSK" | version | HMAC-SHA256(secret, LABEL | purpose | nonce)
    guest → host   ACCEPTED   b"\\x01"; a wrong or late RESPONSE: the guest closes, silent

The secret itself never crosses the channel: a peer that pretends to be the
guest learns one MAC for a nonce of its choosing, which opens no connection to
the real guest (that one picks its own nonces). ``purpose`` keeps the agent's
and the debug console's proofs apart. Each side reads the other's bytes as
untrusted: exact lengths, a deadline, and ``hmac.compare_digest`` for the MAC.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

import trio

from common.errors import HuskError

MAGIC = b"HUSK"
VERSION = 1
SECRET_SIZE = 32
NONCE_SIZE = 32
MAC_SIZE = hashlib.sha256().digest_size
#: what the MAC is computed over, before the purpose and the nonce
LABEL = b"husk channel auth v1"
#: one byte: the connection is the agent's (ttrpc) or the debug console's
AGENT, DEBUG_CONSOLE = 1, 2
PURPOSES = {AGENT: "agent", DEBUG_CONSOLE: "debug console"}
CHALLENGE_SIZE = len(MAGIC) + 2 + NONCE_SIZE
RESPONSE_SIZE = len(MAGIC) + 1 + MAC_SIZE
ACCEPTED = b"\x01"
#: seconds a peer has for its part of the handshake
TIMEOUT = 5.0
#: where a VMM without fw_cfg (Cloud Hypervisor) puts the secret: an SMBIOS type 11
#: (OEM strings) entry ``io.husk.agent-secret=<64 hex digits>``, given over its root-only API
SMBIOS_OEM_PREFIX = "io.husk.agent-secret="


class AuthenticationError(HuskError):
    """The handshake failed: a garbled challenge, a refused proof, or no secret."""


def read_secret(path: Path) -> bytes:
    """The secret in ``path``: exactly ``SECRET_SIZE`` bytes, or AuthenticationError."""
    try:
        with open(path, "rb") as file:
            data = file.read(SECRET_SIZE + 1)
    except OSError as e:
        raise AuthenticationError(f"cannot read the channel secret {path}: {e.strerror}") from None
    if len(data) != SECRET_SIZE:
        raise AuthenticationError(
            f"the channel secret {path} holds {len(data)} bytes, not {SECRET_SIZE}"
        )
    return data


def write_secret(path: Path) -> None:
    """A fresh secret in a new 0600 file at ``path`` (an old one is replaced).

    The file is created with its final mode (never readable by others, not even
    for a moment) and never follows a symlink.
    """
    path.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        view = memoryview(secrets.token_bytes(SECRET_SIZE))
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def challenge(purpose: int, nonce: bytes) -> bytes:
    """The guest's first bytes on a connection."""
    return MAGIC + bytes([VERSION, purpose]) + nonce


def mac(secret: bytes, purpose: int, nonce: bytes) -> bytes:
    """What proves the secret for one challenge."""
    return hmac.new(secret, LABEL + bytes([purpose]) + nonce, hashlib.sha256).digest()


def response(secret: bytes, purpose: int, received: bytes) -> bytes:
    """The host's answer to a challenge; AuthenticationError if it is not one for ``purpose``."""
    if len(received) != CHALLENGE_SIZE or not received.startswith(MAGIC):
        raise AuthenticationError("the peer's first bytes are not a husk channel challenge")
    version, their_purpose = received[len(MAGIC)], received[len(MAGIC) + 1]
    if version != VERSION:
        raise AuthenticationError(f"the peer speaks handshake version {version}, not {VERSION}")
    if their_purpose != purpose:
        what = PURPOSES.get(their_purpose, str(their_purpose))
        raise AuthenticationError(f"the peer is the {what}, not the {PURPOSES[purpose]}")
    nonce = received[len(MAGIC) + 2 :]
    return MAGIC + bytes([VERSION]) + mac(secret, purpose, nonce)


def verify(secret: bytes, purpose: int, nonce: bytes, received: bytes) -> bool:
    """Whether ``received`` answers the challenge of ``nonce`` (constant-time compare)."""
    expected = MAGIC + bytes([VERSION]) + mac(secret, purpose, nonce)
    return len(received) == RESPONSE_SIZE and hmac.compare_digest(received, expected)


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    """``size`` bytes, never more (what follows belongs to the protocol after the
    handshake); fewer only when the stream ends first."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def admit(stream: trio.abc.Stream, secret: bytes, purpose: int) -> bool:
    """The guest's side: challenge the peer and check its answer (the caller bounds the time).

    True: the peer proved the secret and was told so. False: it did not; the
    caller closes the stream without sending anything else.
    """
    nonce = secrets.token_bytes(NONCE_SIZE)
    await stream.send_all(challenge(purpose, nonce))
    received = await receive_exactly(stream, RESPONSE_SIZE)
    if not verify(secret, purpose, nonce, received):
        return False
    await stream.send_all(ACCEPTED)
    return True


async def prove(stream: trio.abc.Stream, secret: bytes, purpose: int) -> None:
    """The host's side: answer the guest's challenge; AuthenticationError unless accepted.

    An EOF before the challenge is an ``OSError(ECONNRESET)`` (the guest's
    listener is not up yet: worth another try); the caller bounds the time.
    """
    received = await receive_exactly(stream, CHALLENGE_SIZE)
    if not received:
        raise OSError(errno.ECONNRESET, "the guest closed the connection before its challenge")
    await stream.send_all(response(secret, purpose, received))
    if await receive_exactly(stream, len(ACCEPTED)) != ACCEPTED:
        raise AuthenticationError(
            f"the guest's {PURPOSES[purpose]} refused this sandbox's secret "
            "(the guest holds another one, or none)"
        )
