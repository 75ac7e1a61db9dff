"""Fixtures for the conformance tests: the Go ttrpc peer, built once per session."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance import gopeer


@pytest.fixture(scope="session")
def go_peer() -> Path:
    """The ``ttrpcpeer`` binary (built offline from Debian's ttrpc, cached by source hash)."""
    return gopeer.build_peer()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed sun_path's 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="husk-ttrpc-") as d:
        yield Path(d)


@pytest.fixture
def go_server(go_peer: Path, sock_dir: Path) -> Iterator[gopeer.GoServer]:
    """A Go ttrpc server serving ``husk.test.Echo`` on a fresh unix socket."""
    with gopeer.go_server(go_peer, sock_dir / "go.sock") as server:
        yield server
        assert server.process.poll() is None, (
            f"the Go server died during the test: {server.stderr_text()}"
        )
