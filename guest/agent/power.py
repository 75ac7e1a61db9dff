"""What DestroySandbox does to the machine once the sandbox is gone.

- ``poweroff``: sync and reboot(2) with ``RB_POWER_OFF`` (the agent is PID 1, or
  nothing else would stop the VM);
- ``exit``: only stop serving; the agent returns and its parent decides (husk's
  init runs the agent as a child and powers off when it exits; tests keep the host);
- ``auto``: ``poweroff`` as PID 1, else ``exit``.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("husk.agent.power")

RB_POWER_OFF = 0x4321FEDC
ACTIONS = ("auto", "poweroff", "exit")


def resolve(action: str) -> str:
    """Turn ``auto`` into the concrete action for this process."""
    if action not in ACTIONS:
        raise ValueError(f"unknown power-off action {action!r}; expected one of {ACTIONS}")
    if action == "auto":
        return "poweroff" if os.getpid() == 1 else "exit"
    return action


def power_off() -> None:
    """Flush disks and power the machine off; returns only if the kernel refused."""
    os.sync()
    log.info("powering off")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(RB_POWER_OFF) != 0:
        log.error("reboot(RB_POWER_OFF) failed: %s", os.strerror(ctypes.get_errno()))


def finish(action: str) -> None:
    """Carry out a resolved action at the end of the agent's life."""
    if resolve(action) == "poweroff":
        power_off()
    else:
        log.info("sandbox destroyed; the agent stops serving")
