"""The channel handshake: only a peer that proves the sandbox's secret is served."""

from __future__ import annotations

import errno
import hmac
import logging
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from common import channel_auth
from common.channel_auth import AuthenticationError
from guest.agent import auth, build_server
from guest.agent.auth import Gate, RefusalLog, read_guest_secret, smbios_oem_strings
from guest.agent.config import AgentConfig
from guest.agent.network import Network
from guest.agent.reaper import Reaper
from guest.agent.sandbox import Sandbox
from guest.agent.service import AgentService
from shim.agent import transport
from shim.agent.client import AgentClient
from ttrpc.server import Server

SECRET = bytes(range(32))


def secret_file(tmp_path: Path, data: bytes = SECRET) -> Path:
    path = tmp_path / "agent.secret"
    path.write_bytes(data)
    return path


async def serve_one(gate: Gate, stream: trio.abc.Stream, results: list[bool]) -> None:
    async with stream:
        results.append(await gate(stream))


async def test_the_right_secret_is_accepted(tmp_path: Path) -> None:
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        await channel_auth.prove(host, SECRET, channel_auth.AGENT)
    assert results == [True]


async def test_a_wrong_secret_is_refused_and_told_nothing(tmp_path: Path) -> None:
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        with pytest.raises(AuthenticationError, match="refused this sandbox's secret"):
            await channel_auth.prove(host, os.urandom(32), channel_auth.AGENT)
    assert results == [False]


async def test_a_garbled_answer_is_refused(tmp_path: Path) -> None:
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        await channel_auth.receive_exactly(host, channel_auth.CHALLENGE_SIZE)
        # a ttrpc request frame where the proof belongs
        await host.send_all(b"\x00\x00\x00\x1b\x00\x00\x00\x01\x01\x00" + b"x" * 40)
        assert await host.receive_some(100) == b""
    assert results == [False]


async def test_a_short_answer_then_eof_is_refused(tmp_path: Path) -> None:
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        await channel_auth.receive_exactly(host, channel_auth.CHALLENGE_SIZE)
        await host.send_all(channel_auth.MAGIC + b"\x01" + b"\x00" * 5)
        await host.aclose()
    assert results == [False]


async def test_a_slow_peer_is_refused_at_the_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT, timeout=3.0)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        challenge = await channel_auth.receive_exactly(host, channel_auth.CHALLENGE_SIZE)
        answer = channel_auth.response(SECRET, channel_auth.AGENT, challenge)
        await host.send_all(answer[:10])  # then silence, one byte short of nothing
        started = trio.current_time()
        assert await host.receive_some(100) == b""
        assert trio.current_time() - started == pytest.approx(3.0, abs=0.01)
    assert results == [False]


async def test_the_proof_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("common.channel_auth.hmac.compare_digest", spy)
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, [])
        await channel_auth.prove(host, SECRET, channel_auth.AGENT)
    assert len(compared) == 1 and len(compared[0][0]) == channel_auth.RESPONSE_SIZE


async def test_without_a_secret_every_connection_is_refused_unchallenged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate(tmp_path / "absent", channel_auth.AGENT)
    with caplog.at_level(logging.ERROR):
        assert not gate.check()
    assert "every vsock and unix connection is refused" in caplog.text
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        assert await host.receive_some(100) == b""  # not even a challenge
    assert results == [False]


async def test_a_secret_of_the_wrong_size_counts_as_none(tmp_path: Path) -> None:
    gate = Gate(secret_file(tmp_path, b"short"), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        assert await host.receive_some(100) == b""
    assert results == [False]


async def test_the_secret_is_read_afresh_for_each_connection(tmp_path: Path) -> None:
    """A template's clone: the same agent, a new fw_cfg file; the old secret stops working."""
    path = secret_file(tmp_path)
    gate = Gate(path, channel_auth.AGENT)
    path.write_bytes(b"\x07" * 32)
    host, guest = trio.testing.memory_stream_pair()
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, results)
        with pytest.raises(AuthenticationError):
            await channel_auth.prove(host, SECRET, channel_auth.AGENT)
    assert results == [False]


async def test_the_host_refuses_a_challenge_for_another_purpose(tmp_path: Path) -> None:
    gate = Gate(secret_file(tmp_path), channel_auth.DEBUG_CONSOLE)
    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, gate, guest, [])
        with pytest.raises(AuthenticationError, match="is the debug console, not the agent"):
            await channel_auth.prove(host, SECRET, channel_auth.AGENT)
        await host.aclose()


async def test_eof_before_the_challenge_is_worth_another_try() -> None:
    host, guest = trio.testing.memory_stream_pair()
    await guest.aclose()
    with pytest.raises(OSError) as err:
        await channel_auth.prove(host, SECRET, channel_auth.AGENT)
    assert err.value.errno == errno.ECONNRESET


def test_refusals_are_logged_at_most_burst_times_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(burst=2, interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(10):
            refusals.refused("agent", "vsock cid 2 port 5", "no proof")
        now[0] = 61.0
        refusals.refused("agent", "vsock cid 2 port 6", "no proof")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[2].endswith("(8 more refused since the last line)")


def test_a_secret_file_is_32_fresh_bytes_readable_by_root_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        channel_auth.write_secret(tmp_path / "a")
        channel_auth.write_secret(tmp_path / "b")
    finally:
        os.umask(old)
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    a, b = (channel_auth.read_secret(tmp_path / n) for n in ("a", "b"))
    assert len(a) == 32 and a != b


def test_a_secret_file_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / "agent.secret").symlink_to(target)
    channel_auth.write_secret(tmp_path / "agent.secret")  # replaces the link, not its target
    assert target.read_bytes() == b"keep"
    assert not (tmp_path / "agent.secret").is_symlink()


async def test_ttrpc_serves_only_admitted_streams(tmp_path: Path) -> None:
    """The agent's server behind the gate: the shim's client works, a stranger gets nothing."""
    server: Server = build_server_for_test(tmp_path)
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT)
    host, guest = trio.testing.memory_stream_pair()
    stranger, stranger_guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, guest, gate)
        nursery.start_soon(server.serve_stream, stranger_guest, gate)
        await transport.authenticate(host, SECRET, channel_auth.AGENT, "test")
        async with AgentClient.open(host, request_timeout=5) as agent:
            assert (await agent.check()).status == 1
        await channel_auth.receive_exactly(stranger, channel_auth.CHALLENGE_SIZE)
        await stranger.send_all(b"\x00" * channel_auth.RESPONSE_SIZE)
        assert await stranger.receive_some(100) == b""
        await server.shutdown(1)


async def test_shutdown_cancels_a_handshake_in_progress(tmp_path: Path) -> None:
    server = build_server_for_test(tmp_path)
    gate = Gate(secret_file(tmp_path), channel_auth.AGENT, timeout=60)
    _, guest = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, guest, gate)
            await trio.testing.wait_all_tasks_blocked()
            await server.shutdown(1)


def build_server_for_test(tmp_path: Path) -> Server:
    config = AgentConfig(state_dir=tmp_path / "state", host_mode=True)
    return build_server(AgentService(Sandbox(config, Reaper()), Network()))


def smbios_structure(kind: int, formatted: bytes, *strings: bytes) -> bytes:
    header = bytes([kind, 4 + len(formatted)]) + b"\x00\x10" + formatted
    return header + (b"\0".join(strings) + b"\0\0" if strings else b"\0\0")


def smbios_table(*oem: bytes) -> bytes:
    return (
        smbios_structure(0, b"\x01\x02", b"vendor", b"1.0")
        + smbios_structure(11, bytes([len(oem)]), *oem)
        + smbios_structure(1, b"\x01", b"husk")
        + smbios_structure(127, b"")
    )


def test_oem_strings_are_found_among_the_smbios_structures() -> None:
    table = smbios_table(b"a=1", b"io.husk.agent-secret=" + SECRET.hex().encode())
    assert smbios_oem_strings(table) == [b"a=1", b"io.husk.agent-secret=" + SECRET.hex().encode()]
    assert smbios_oem_strings(b"\x0b\x02garbage") == []  # a length below 4: stop, no crash
    assert smbios_oem_strings(table[:20]) == []  # cut short: what is whole, nothing else


def test_without_fw_cfg_the_guest_takes_the_smbios_oem_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloud Hypervisor has no fw_cfg: its secret comes as an SMBIOS type 11 string."""
    table = tmp_path / "DMI"
    monkeypatch.setattr(auth, "FW_CFG_SECRET", tmp_path / "no-fw-cfg")
    monkeypatch.setattr(auth, "SMBIOS_TABLE", table)
    table.write_bytes(smbios_table(b"io.husk.agent-secret=" + SECRET.hex().encode()))
    assert read_guest_secret(tmp_path / "no-fw-cfg") == SECRET
    for bad in (b"io.husk.agent-secret=" + b"zz" * 32, b"io.husk.agent-secret=abcd", b"x=1"):
        table.write_bytes(smbios_table(bad))
        with pytest.raises(AuthenticationError, match=r"no well-formed io\.husk\.agent-secret="):
            read_guest_secret(tmp_path / "no-fw-cfg")
    # a host-mode agent's own file never falls back
    with pytest.raises(AuthenticationError, match="cannot read the channel secret"):
        read_guest_secret(tmp_path / "other")
