"""Shared integration fixtures: a real containerd on a temp root, and ctr against it.

``containerd_factory(env=..., binaries=...)`` starts ``containerd --config <minimal
toml>`` whose root, state, socket and config live in a short temp dir (unix
socket paths are limited to 108 bytes) and stops it at the end of the test.
``Containerd.ctr(...)`` runs ``ctr --address``. Any extra environment (e.g.
``HUSK_CONFIG``) reaches the shims containerd starts.

**The containerd matrix.** A test that asks for ``containerd_binaries`` runs
once per containerd release of the matrix (``1.6``, ``1.7``, ``2.4``; see
``containerd_versions``), as ``test_x[2.4]``; one marked
``main_containerd_only`` runs on ``MAIN_CONTAINERD`` alone, one marked
``containerd_lines("2.4")`` on the releases it names (a feature only they have).
``$HUSK_TEST_CONTAINERD_VERSIONS`` (e.g. ``1.6,2.4``) narrows the matrix for
a developer; ``tests/run`` leaves it whole. The releases other than the
system's are fetched or built in a background thread from the end of
collection on, while the tests of the main release run first (the
others' tests are moved to the end of the session); a release that cannot be
provided skips its tests, which ``tests/run`` counts as failures.

``shared_template`` is a ``[factory]`` section for one VM template shared by
the session (and by every containerd release): modules whose sandboxes need
no cold boot of their own start them as clones (a few seconds each instead of
a cold boot), as a host with templates enabled would. Modules about booting
itself keep cold boots.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from common import mounts
from shim.sandbox import cleanup
from tests.integration import containerd_versions
from tests.integration.containerd import SYSTEM, Containerd
from tests.integration.containerd_versions import ContainerdBinaries, ProvisionError

#: the release every test runs on; the others run the version-sensitive tests
MAIN_CONTAINERD = "1.6"
MATRIX = ("1.6", "1.7", "2.4")
VERSIONS_ENV = "HUSK_TEST_CONTAINERD_VERSIONS"
LINE_PARAM = "containerd_line"


def matrix() -> list[str]:
    """The releases this run covers: ``MATRIX``, or ``$HUSK_TEST_CONTAINERD_VERSIONS``."""
    chosen = os.environ.get(VERSIONS_ENV, "")
    if not chosen:
        return list(MATRIX)
    lines = [line.strip() for line in chosen.split(",") if line.strip()]
    unknown = [line for line in lines if line not in MATRIX]
    if unknown:
        raise pytest.UsageError(f"{VERSIONS_ENV}: {', '.join(unknown)} not in {', '.join(MATRIX)}")
    return lines


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "main_containerd_only: not sensitive to the containerd release; main one only"
    )
    config.addinivalue_line(
        "markers", "containerd_lines(*lines): runs only on these releases of the matrix"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if LINE_PARAM not in metafunc.fixturenames:
        return
    lines = matrix()
    if metafunc.definition.get_closest_marker("main_containerd_only"):
        lines = [line for line in lines if line == MAIN_CONTAINERD] or lines[:1]
    only = metafunc.definition.get_closest_marker("containerd_lines")
    if only is not None:
        lines = [line for line in lines if line in only.args]
    metafunc.parametrize(LINE_PARAM, lines, scope="module")


def _line_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    line = callspec.params.get(LINE_PARAM) if callspec is not None else None
    # a test for releases the narrowed matrix leaves out has an empty parameter set
    return line if isinstance(line, str) else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The main release's tests first; each other release's after, in matrix order."""
    rank = {line: index for index, line in enumerate(MATRIX)}
    items.sort(key=lambda item: 0 if _line_of(item) in (None, MAIN_CONTAINERD) else
               1 + rank[_line_of(item) or MAIN_CONTAINERD])  # fmt: skip


class Provisioner:
    """Fetches and builds the matrix's releases in one background thread, once each."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="containerd-provision")
        self._futures: dict[str, Future[ContainerdBinaries]] = {}
        self._lock = threading.Lock()

    def start(self, line: str) -> Future[ContainerdBinaries]:
        """Begin providing ``line`` (no-op if begun)."""
        with self._lock:
            if line not in self._futures:
                self._futures[line] = self._pool.submit(containerd_versions.provide, line)
            return self._futures[line]

    def get(self, line: str) -> ContainerdBinaries:
        """``line``'s binaries, waiting for its fetch or build."""
        return self.start(line).result()

    def close(self) -> None:
        """Drop what has not begun and stop what is under way (the session is over)."""
        containerd_versions.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


_PROVISIONER = Provisioner()


def pytest_collection_finish(session: pytest.Session) -> None:
    lines = {_line_of(item) for item in session.items} - {None, MAIN_CONTAINERD}
    for line in MATRIX:
        if line in lines:
            _PROVISIONER.start(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    _PROVISIONER.close()


@pytest.fixture(scope="module")
def containerd_binaries(containerd_line: str) -> ContainerdBinaries:
    """The binaries of this test's containerd release (fetched or built if need be)."""
    try:
        return _PROVISIONER.get(containerd_line)
    except ProvisionError as e:
        pytest.skip(f"containerd {containerd_line} cannot be provided: {e}")


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

    def start(
        env: Mapping[str, str] | None = None, binaries: ContainerdBinaries = SYSTEM
    ) -> Containerd:
        base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        daemon = Containerd(base, env or {}, binaries)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
