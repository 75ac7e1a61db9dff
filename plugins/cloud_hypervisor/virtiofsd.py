"""virtiofsd: the vhost-user daemon behind a virtio-fs share.

Cloud Hypervisor has no 9p; a host directory reaches the guest through
virtio-fs, served by one ``virtiofsd`` per share. The command line is the one
both daemons take: QEMU's C ``virtiofsd`` (all Debian 12 has, in
``qemu-system-common``) and the Rust one (Debian 13's ``virtiofsd``, which
keeps the ``-o`` options for compatibility). It runs in its own namespaces
(``sandbox=namespace``) with the shared directory as its root; mounts the
sandbox makes there later (container rootfs, volumes) propagate into its view,
and ``announce_submounts`` gives each its own inode space in the guest.
"""

from __future__ import annotations

from pathlib import Path

import trio

from plugins.cloud_hypervisor.process import HelperProcess
from shim.errors import DeadlineExceededError
from shim.hypervisor import SharedFsDevice

_POLL = 0.02


def argv(binary: str, device: SharedFsDevice, sock: Path) -> list[str]:
    """virtiofsd's command line for one share."""
    return [
        binary,
        f"--socket-path={sock}",
        "-o",
        f"source={device.path}",
        "-o",
        "cache=auto",
        "-o",
        "sandbox=namespace",
        "-o",
        "announce_submounts",
        "--thread-pool-size=1",
    ]


async def start(
    binary: str, device: SharedFsDevice, sock: Path, log: Path, timeout: float
) -> HelperProcess:
    """Start virtiofsd for ``device``; return once its socket accepts connections.

    virtiofsd serves one vhost-user frontend and exits when it disconnects, so
    readiness is seen in the socket file, not by connecting to it.
    """
    sock.unlink(missing_ok=True)
    process = await HelperProcess.spawn(
        argv(binary, device, sock), log=log, name="virtiofsd", key="virtiofsd"
    )
    try:
        with trio.fail_after(timeout):
            while not sock.is_socket():
                if not process.alive:
                    raise process.exited_error()
                await trio.sleep(_POLL)
    except trio.TooSlowError:
        await process.kill()
        raise DeadlineExceededError(
            f"virtiofsd for share {device.tag} did not create {sock} within {timeout:g} s "
            f"(see {log})"
        ) from None
    except BaseException:
        await process.kill()
        raise
    return process
