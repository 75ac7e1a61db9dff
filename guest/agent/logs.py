"""The agent's log: the console (stderr), every line prefixed ``husk-agent:``.

Debug level comes from ``--debug`` or the kernel command line: ``husk.debug=1``
(or Kata's ``agent.log=debug``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

PREFIX = "husk-agent"


def debug_from_cmdline(cmdline: str) -> bool:
    """Whether a kernel command line asks for the agent's debug log."""
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == "husk.debug" and value.lower() in ("1", "true", "yes", "on", ""):
            return True
        if key == "agent.log" and value.lower() == "debug":
            return True
    return False


def read_cmdline(path: Path = Path("/proc/cmdline")) -> str:
    """The kernel command line, or "" where it cannot be read."""
    try:
        return path.read_text()
    except OSError:
        return ""


def setup(debug: bool) -> None:
    """Log to stderr at INFO, or DEBUG when ``debug``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PREFIX}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
