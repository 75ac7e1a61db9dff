"""Shared integration fixtures: a real containerd on a temp root, and ctr against it.

``containerd_factory(env=...)`` starts ``containerd --config <minimal toml>`` whose
root, state, socket and config live in a short temp dir (unix socket paths are
limited to 108 bytes) and stops it at the end of the test; ``containerd`` is
one instance shared by a module. ``Containerd.ctr(...)`` runs ``ctr --address``.
Any extra environment (e.g. ``HUSK_CONFIG``) reaches the shims containerd starts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.integration.containerd import Containerd


@pytest.fixture
def containerd_factory() -> Iterator[Callable[..., Containerd]]:
    """Start containerd instances (with extra env) that are stopped after the test."""
    started: list[Containerd] = []

    def start(env: Mapping[str, str] | None = None) -> Containerd:
        base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        daemon = Containerd(base, env or {})
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
