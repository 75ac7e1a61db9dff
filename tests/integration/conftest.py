"""Shared integration fixtures: a real containerd on a temp root, and ctr against it.

``containerd_factory(env=...)`` starts ``containerd --config <minimal toml>`` whose
root, state, socket and config live in a short temp dir (unix socket paths are
limited to 108 bytes) and stops it at the end of the test; ``containerd`` is
one instance shared by a module. ``Containerd.ctr(...)`` runs ``ctr --address``.
Any extra environment (e.g. ``HUSK_CONFIG``) reaches the shims containerd starts.

``shared_template`` is a ``[factory]`` section for one VM template shared by
the session: modules whose sandboxes need no cold boot of their own start
them as clones (a few seconds each instead of a cold boot), as a host with
templates enabled would. Modules about booting itself keep cold boots.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from common import mounts
from shim.sandbox import cleanup
from tests.integration.containerd import Containerd


@pytest.fixture(scope="session")
def shared_template() -> Iterator[str]:
    """A ``[factory]`` section (TOML) naming the session's VM template; removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="htpl-", dir="/tmp"))
    path = base / "template"
    yield f'[factory]\nenable_template = true\ntemplate_path = "{path}"\n'
    cleanup.kill_and_wait(cleanup.processes_naming(path))
    for point in mounts.mounts_under(base):
        mounts.unmount(point)
    shutil.rmtree(base, ignore_errors=True)


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
