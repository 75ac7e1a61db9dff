"""Go client against Go server: proves the reference peer itself before it judges husk.

If these fail, the conformance failures elsewhere say nothing about husk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conformance import gopeer

pytestmark = pytest.mark.conformance


def test_peer_reports_its_feature_set(go_peer: Path) -> None:
    result = subprocess.run([str(go_peer), "version"], capture_output=True, check=True, timeout=30)
    (line,) = gopeer.parse_lines(result.stdout)
    assert line["max_message"] == gopeer.MAX_MESSAGE
    assert line["streaming"] is False  # Debian's ttrpc 1.1.1 has no streams


def test_build_is_cached(go_peer: Path) -> None:
    assert gopeer.build_peer() == go_peer


def test_echo(go_peer: Path, go_server: gopeer.GoServer) -> None:
    r = gopeer.run_client(go_peer, go_server.socket, "echo", "-data", "ünïcode & bytes")
    assert r.returncode == 0, r.describe()
    assert r.line["data"] == "ünïcode & bytes"


def test_metadata_round_trips_in_order(go_peer: Path, go_server: gopeer.GoServer) -> None:
    r = gopeer.run_client(
        go_peer, go_server.socket, "metadata", "-md", "k=1", "-md", "k=2", "-md", "other=x"
    )
    assert r.returncode == 0, r.describe()
    assert r.line["metadata"] == {"k": ["1", "2"], "other": ["x"]}


def test_deadline_expires_and_connection_survives(
    go_peer: Path, go_server: gopeer.GoServer
) -> None:
    r = gopeer.run_client(
        go_peer, go_server.socket, "deadline", "-timeout-ms", "200", "-sleep-ms", "5000"
    )
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == 4  # DeadlineExceeded
    assert 150 <= r.line["elapsed_ms"] < 2000


def test_deadline_is_propagated_to_the_server(go_peer: Path, go_server: gopeer.GoServer) -> None:
    r = gopeer.run_client(
        go_peer, go_server.socket, "deadline", "-timeout-ms", "3000", "-sleep-ms", "10"
    )
    assert r.returncode == 0, r.describe()
    assert 2000 < r.line["deadline_seen_ms"] <= 3000


@pytest.mark.parametrize("code", [1, 3, 5, 6, 9, 12, 13, 14, 16])
def test_error_codes(go_peer: Path, go_server: gopeer.GoServer, code: int) -> None:
    r = gopeer.run_client(go_peer, go_server.socket, "error", "-code", str(code))
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == code
    assert r.line["error"]["message"] == f"fail with code {code}"


def test_unknown_method_is_unimplemented(go_peer: Path, go_server: gopeer.GoServer) -> None:
    r = gopeer.run_client(go_peer, go_server.socket, "unknown")
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == 12


def test_payload_near_the_limit(go_peer: Path, go_server: gopeer.GoServer) -> None:
    size = gopeer.MAX_MESSAGE - 1024
    r = gopeer.run_client(go_peer, go_server.socket, "large", "-size", str(size))
    assert r.returncode == 0, r.describe()
    assert r.line["received"] == size


def test_payload_over_the_limit_is_resource_exhausted(
    go_peer: Path, go_server: gopeer.GoServer
) -> None:
    r = gopeer.run_client(go_peer, go_server.socket, "large", "-size", str(gopeer.MAX_MESSAGE))
    assert r.returncode == 1, r.describe()
    assert r.line["error"]["code"] == 8  # ResourceExhausted, and the server lives on
    again = gopeer.run_client(go_peer, go_server.socket, "echo")
    assert again.returncode == 0, again.describe()


def test_concurrent_calls_on_one_connection(go_peer: Path, go_server: gopeer.GoServer) -> None:
    r = gopeer.run_client(go_peer, go_server.socket, "concurrent", "-callers", "32", "-calls", "50")
    assert r.returncode == 0, r.describe()
    assert r.line["good"] == 32 * 50


def test_client_fails_against_a_dead_socket(go_peer: Path, sock_dir: Path) -> None:
    r = gopeer.run_client(go_peer, sock_dir / "nobody.sock", "echo")
    assert r.returncode == 1
    assert r.line["ok"] is False


def test_server_enforces_the_deadline_it_was_sent(
    go_peer: Path, go_server: gopeer.GoServer
) -> None:
    r = gopeer.run_client(
        go_peer,
        go_server.socket,
        "deadline",
        "-server-only",
        "-timeout-ms",
        "300",
        "-sleep-ms",
        "5000",
    )
    assert r.returncode == 0, r.describe()
    assert r.line["error"]["code"] == 4
    assert "local" not in r.line["error"]  # the status came from the server
