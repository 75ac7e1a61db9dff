"""The guest machine itself: details, CPU/memory hot-plug, files, clock, entropy."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
from pathlib import Path

from agent_proto import agent_pb2
from common.errors import InvalidArgumentError, NotFoundError
from guest.agent import storage
from guest.agent.storage import SysfsLayout

log = logging.getLogger("husk.agent.system")

AGENT_VERSION = "0.1.0"
#: the agent's own ``oom_score_adj``: the OOM killer never picks it
OOM_SCORE_ADJ_MIN = -1000
API_VERSION = "0.0.1"


def guest_details(
    request: agent_pb2.GuestDetailsRequest, layout: SysfsLayout
) -> agent_pb2.GuestDetailsResponse:
    """Memory block size, hot-plug probe support and what this agent is."""
    memory = layout.sys / "devices" / "system" / "memory"
    response = agent_pb2.GuestDetailsResponse()
    if request.mem_block_size:
        try:
            response.mem_block_size_bytes = int(
                (memory / "block_size_bytes").read_text().strip(), 16
            )
        except (OSError, ValueError):
            response.mem_block_size_bytes = 0
    if request.mem_hotplug_probe:
        response.support_mem_hotplug_probe = (memory / "probe").exists()
    details = response.agent_details
    details.version = AGENT_VERSION
    details.init_daemon = os.getpid() == 1
    details.storage_handlers.extend(storage.STORAGE_DRIVERS)
    details.supports_seccomp = True
    return response


def _online(path: Path, value: str) -> bool:
    try:
        if path.read_text().strip() in ("1", "online"):
            return False
        path.write_text(value)
        return True
    except OSError as exc:
        log.debug("cannot online %s: %s", path.parent.name, exc)
        return False


def online_cpus(layout: SysfsLayout) -> int:
    """Online every offline CPU; return how many changed."""
    cpus = sorted((layout.sys / "devices" / "system" / "cpu").glob("cpu[0-9]*/online"))
    return sum(_online(p, "1") for p in cpus)


def online_memory(layout: SysfsLayout) -> int:
    """Online every offline memory block; return how many changed."""
    blocks = sorted((layout.sys / "devices" / "system" / "memory").glob("memory[0-9]*/state"))
    return sum(_online(p, "online") for p in blocks)


def count_online_cpus(layout: SysfsLayout) -> int:
    """CPUs online now (cpu0 usually has no ``online`` file and counts as online)."""
    total = 0
    for cpu in (layout.sys / "devices" / "system" / "cpu").glob("cpu[0-9]*"):
        flag = cpu / "online"
        try:
            total += 1 if not flag.exists() or flag.read_text().strip() == "1" else 0
        except OSError:
            continue
    return total


def protect_from_oom_killer(proc_self: Path = Path("/proc/self")) -> None:
    """Keep the agent out of the guest OOM killer's reach (``oom_score_adj`` -1000, as Kata).

    Children inherit the value, so the agent's children must not keep it
    (``command.reset_children_oom_score_adj``) and every container process gets
    its own (``oci.runc_config`` always writes ``oomScoreAdj``): an unkillable
    container would make a memory cgroup OOM loop forever instead of killing it.
    """
    try:
        (proc_self / "oom_score_adj").write_text(str(OOM_SCORE_ADJ_MIN))
    except OSError as exc:
        log.warning("cannot protect the agent from the OOM killer: %s", exc)


def mem_hotplug_probe(addresses: list[int], layout: SysfsLayout) -> None:
    """Tell the kernel about hot-added memory at each physical address."""
    probe = layout.sys / "devices" / "system" / "memory" / "probe"
    if not probe.exists():
        raise NotFoundError(f"{probe} does not exist: the guest kernel has no memory probe")
    for address in addresses:
        probe.write_text(f"{address:#x}")


def copy_file(request: agent_pb2.CopyFileRequest, root: Path) -> None:
    """Write one chunk of a file below ``root``; move it into place when complete.

    Chunks are written at their offset into ``<path>.husk-copy``; once the temp
    file has ``file_size`` bytes it gets mode, owner and its final name.
    """
    path = Path(request.path)
    if not path.is_absolute() or ".." in path.parts:
        raise InvalidArgumentError(f"CopyFile path {request.path!r} must be absolute and canonical")
    if not path.is_relative_to(root) or path == root:
        raise InvalidArgumentError(f"CopyFile path {request.path!r} is not below {root}")
    if request.offset < 0 or request.file_size < 0:
        raise InvalidArgumentError(f"CopyFile of {request.path}: negative offset or size")
    dir_mode = request.dir_mode or 0o755
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".husk-copy")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if request.offset == 0:
            os.ftruncate(fd, 0)
        os.pwrite(fd, request.data, request.offset)
        size = os.fstat(fd).st_size
        if size < request.file_size:
            return
        os.fchmod(fd, (request.file_mode or 0o644) & 0o7777)
        os.fchown(fd, request.uid, request.gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def set_time(seconds: int, microseconds: int) -> None:
    """Set the guest's wall clock."""
    time.clock_settime(time.CLOCK_REALTIME, seconds + microseconds / 1_000_000)


#: ioctls on /dev/random (linux/random.h)
RNDADDTOENTCNT = 0x40045201
RNDRESEEDCRNG = 0x5207


def reseed_random(data: bytes) -> None:
    """Mix ``data`` into the kernel's pool, credit it, and reseed the CRNG from it now.

    A VM cloned from a template starts with the template's CRNG state: a
    write alone only mixes the bytes into the input pool, and the CRNG would
    go on producing what every other clone produces. ``RNDRESEEDCRNG`` makes
    it take the new entropy at once (as Kata's agent does).
    """
    fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
        fcntl.ioctl(fd, RNDADDTOENTCNT, struct.pack("i", len(data) * 8))
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
