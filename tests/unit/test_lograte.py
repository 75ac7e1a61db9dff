"""A flood of one message reaches the shim's log a few times, then a count."""

from __future__ import annotations

import logging

from shim.lograte import RateLimit


def record(msg: str, level: int = logging.WARNING, name: str = "husk.x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_a_flood_passes_burst_records_then_reports_what_it_dropped() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, interval=10.0, clock=lambda: now[0])
    passed = [limit.filter(record("ttrpc: stray frame %d")) for _ in range(1000)]
    assert passed.count(True) == 3
    now[0] = 10.0
    again = record("ttrpc: stray frame %d")
    assert limit.filter(again)
    assert again.msg.endswith("(997 similar messages dropped)")


def test_templates_are_limited_apart() -> None:
    limit = RateLimit(burst=1, interval=10.0, clock=lambda: 0.0)
    assert limit.filter(record("a"))
    assert limit.filter(record("b"))
    assert not limit.filter(record("a"))


def test_debug_records_are_never_limited() -> None:
    limit = RateLimit(burst=1, interval=10.0, clock=lambda: 0.0)
    assert all(limit.filter(record("d", logging.DEBUG)) for _ in range(50))
