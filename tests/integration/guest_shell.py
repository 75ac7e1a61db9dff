"""A shell line run in a real guest through its debug console, and what it printed."""

from __future__ import annotations

import os

import trio

from plugins.qemu.driver import QemuHypervisor
from shim.agent.transport import connect
from shim.cli.debug_console import Attachment
from shim.errors import DeadlineExceededError


async def guest_shell(hv: QemuHypervisor, line: str, attempts: int = 3) -> str:
    """Run ``line`` (newline-terminated) in the guest's debug console; the screen text.

    virtio-serial drops what the host sends while the guest has its port closed
    (it reopens it after each host hang-up): an OPEN lost that way is sent again.
    """
    for _ in range(attempts - 1):
        try:
            return await _shell(hv, line)
        except DeadlineExceededError:
            continue
    return await _shell(hv, line)


async def _shell(hv: QemuHypervisor, line: str) -> str:
    endpoint = hv.debug_console_endpoint()
    assert endpoint is not None
    keyboard_r, keyboard_w = os.pipe()
    screen_r, screen_w = os.pipe()
    os.write(keyboard_w, line.encode())
    os.write(keyboard_w, b"exit 0\n")
    try:
        stream = await connect(endpoint, 30)
        async with stream:
            attachment = Attachment(stream, stdin=keyboard_r, stdout=screen_w)
            with trio.fail_after(60):
                outcome = await attachment.run(await attachment.open("dumb"))
        assert outcome.status == 0
        os.close(screen_w)
        screen_w = -1
        with os.fdopen(screen_r, "rb", closefd=False) as screen:
            return screen.read().decode(errors="replace")
    finally:
        for fd in (keyboard_r, keyboard_w, screen_r, screen_w):
            if fd >= 0:
                os.close(fd)
