"""Which host connections the agent serves: only its own shim's.

Every connection on vsock (and on the unix socket of a host-mode agent) must
first pass :func:`common.channel_auth.admit` with the sandbox's secret. The
secret is read afresh for each connection: in a VM it is the ``fw_cfg`` file
QEMU was started with, so a clone of a VM template, whose QEMU carries the
clone's own file, answers only the clone's secret and never the template's
(``fw_cfg`` contents are not part of a migration stream). Under a VMM without
fw_cfg (Cloud Hypervisor) it is an SMBIOS OEM string, read from the raw DMI
table (root-only in sysfs, as the fw_cfg file is). A guest without a secret
refuses every such connection: it fails closed.

virtio-serial needs no handshake: its host end is QEMU's unix socket in the
sandbox's root-only state dir, so only root on the host reaches it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from common import channel_auth
from common.channel_auth import AuthenticationError

log = logging.getLogger("husk.agent.auth")

#: where the guest kernel (``qemu_fw_cfg``) shows the file QEMU got with
#: ``-fw_cfg name=opt/io.husk/agent-secret,file=...``
FW_CFG_SECRET = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/io.husk/agent-secret/raw")
#: the firmware's whole SMBIOS table, as the kernel found it (CONFIG_DMI, no module)
SMBIOS_TABLE = Path("/sys/firmware/dmi/tables/DMI")
_SMBIOS_OEM_STRINGS = 11
_SMBIOS_END = 127
#: refusals logged per window; the rest are counted and summed up in the next line
LOG_BURST = 5
LOG_INTERVAL = 60.0


class RefusalLog:
    """At most ``burst`` lines per ``interval`` seconds about refused connections."""

    def __init__(
        self,
        burst: int = LOG_BURST,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._start = -interval
        self._logged = 0
        self.dropped = 0

    def refused(self, what: str, peer: str, reason: str) -> None:
        """Note one refused connection."""
        now = self._clock()
        if now - self._start >= self.interval:
            self._start, self._logged = now, 0
        if self._logged >= self.burst:
            self.dropped += 1
            return
        self._logged += 1
        dropped, self.dropped = self.dropped, 0
        more = f" ({dropped} more refused since the last line)" if dropped else ""
        log.warning("%s: refused a connection from %s: %s%s", what, peer, reason, more)


def smbios_oem_strings(table: bytes) -> list[bytes]:
    """Every string of every type 11 (OEM strings) structure in a raw SMBIOS table."""
    found: list[bytes] = []
    offset = 0
    while offset + 4 <= len(table):
        kind, length = table[offset], table[offset + 1]
        if length < 4:
            break  # a malformed structure: nothing after it can be trusted to line up
        strings_at = offset + length
        end = table.find(b"\0\0", strings_at)
        if end < 0:
            break
        if kind == _SMBIOS_OEM_STRINGS:
            found += [s for s in table[strings_at:end].split(b"\0") if s]
        if kind == _SMBIOS_END:
            break
        offset = end + 2
    return found


def read_smbios_secret(table: Path = SMBIOS_TABLE) -> bytes:
    """The secret a VMM put in an SMBIOS OEM string; AuthenticationError if there is none."""
    try:
        data = table.read_bytes()
    except OSError as e:
        raise AuthenticationError(f"cannot read the SMBIOS table {table}: {e.strerror}") from None
    prefix = channel_auth.SMBIOS_OEM_PREFIX.encode()
    for string in smbios_oem_strings(data):
        if string.startswith(prefix):
            try:
                secret = bytes.fromhex(string[len(prefix) :].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                break
            if len(secret) == channel_auth.SECRET_SIZE:
                return secret
            break
    raise AuthenticationError(f"no well-formed {channel_auth.SMBIOS_OEM_PREFIX} OEM string")


def read_guest_secret(secret_file: Path) -> bytes:
    """The sandbox's secret: ``secret_file``; for the VM's default path, SMBIOS without fw_cfg."""
    try:
        return channel_auth.read_secret(secret_file)
    except AuthenticationError as e:
        if secret_file != FW_CFG_SECRET:
            raise
        try:
            return read_smbios_secret(SMBIOS_TABLE)
        except AuthenticationError as smbios:
            raise AuthenticationError(f"{e}; and {smbios} in {SMBIOS_TABLE}") from None


def describe_peer(stream: trio.abc.Stream) -> str:
    """Who connected, as far as the socket says (a vsock CID and port, or unix)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "an unknown peer"
    try:
        peer = sock.getpeername()
    except OSError:
        return "a peer that is gone"
    if sock.family == socket.AF_VSOCK and isinstance(peer, tuple):
        return f"vsock cid {peer[0]} port {peer[1]}"
    return "a unix socket peer"


class Gate:
    """Admits a connection only when its peer proves the secret in ``secret_file``."""

    def __init__(
        self,
        secret_file: Path,
        purpose: int,
        *,
        timeout: float = channel_auth.TIMEOUT,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.secret_file = secret_file
        self.purpose = purpose
        self.timeout = timeout
        self.refusals = refusals if refusals is not None else RefusalLog()
        self.what = channel_auth.PURPOSES[purpose]

    def check(self) -> bool:
        """Whether a secret is there now; says once, in one line, what follows if not."""
        try:
            read_guest_secret(self.secret_file)
        except AuthenticationError as e:
            log.error("%s: %s; every vsock and unix connection is refused", self.what, e)
            return False
        return True

    async def __call__(self, stream: trio.abc.Stream) -> bool:
        """Run the handshake on a new connection; False: close it unserved."""
        try:
            secret = read_guest_secret(self.secret_file)
        except AuthenticationError as e:
            self.refusals.refused(self.what, describe_peer(stream), str(e))
            return False
        reason = f"no proof within {self.timeout:g} s"
        with trio.move_on_after(self.timeout):
            try:
                if await channel_auth.admit(stream, secret, self.purpose):
                    return True
                reason = "a wrong or garbled proof of the secret"
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                reason = f"the connection failed during the handshake ({e})"
        self.refusals.refused(self.what, describe_peer(stream), reason)
        return False
