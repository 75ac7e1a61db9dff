"""Rate-limited logging: a hostile guest must not flood the shim's log.

Much of what the shim logs at warning level is caused by the guest (a reply
that does not decode, a frame on an unknown stream, an event for a container
this sandbox does not have). :class:`RateLimit` is a ``logging.Filter`` for
the shim's handler: each distinct message template (logger + format string)
may pass ``burst`` times per ``interval`` seconds; the rest are counted, and
the next record of that template that passes says how many were dropped.
Debug records are never limited (they are off unless asked for).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

#: templates remembered at once; the oldest window is forgotten past this
MAX_TEMPLATES = 256


@dataclass
class _Window:
    start: float
    passed: int = 0
    dropped: int = 0


class RateLimit(logging.Filter):
    """Pass at most ``burst`` records of each template per ``interval`` seconds."""

    def __init__(
        self,
        burst: int = 10,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._windows: dict[tuple[str, object], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        key = (record.name, record.msg)
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            dropped = window.dropped if window is not None else 0
            window = self._windows[key] = _Window(now)
            if len(self._windows) > MAX_TEMPLATES:
                del self._windows[next(iter(self._windows))]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar messages dropped)"
        if window.passed >= self.burst:
            window.dropped += 1
            return False
        window.passed += 1
        return True
