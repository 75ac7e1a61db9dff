"""The debug console: its framing, the guest's shell on a pty, `husk exec` against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from common import channel_auth, console
from guest.agent.auth import Gate
from guest.agent.debug_console import Session, enabled, serve_connection
from guest.agent.reaper import Reaper
from shim.agent.transport import authenticate
from shim.cli.debug_console import Attachment
from shim.sandbox.state import SandboxState

ROOT = Path(__file__).resolve().parents[2]


def test_frames_round_trip_across_arbitrary_splits() -> None:
    wire = (
        console.encode_open(30, 100, "xterm-256color")
        + console.encode_data(console.INPUT, b"x" * 70_000)
        + console.encode_exited(-9)
    )
    decoder = console.Decoder()
    frames = [f for i in range(0, len(wire), 7) for f in decoder.feed(wire[i : i + 7])]
    assert [f.kind for f in frames] == [console.OPEN, console.INPUT, console.INPUT, console.EXITED]
    assert console.size_of(frames[0]) == (30, 100)
    assert console.term_of(frames[0]) == "xterm-256color"
    assert sum(len(f.payload) for f in frames[1:3]) == 70_000
    assert console.status_of(frames[3]) == -9


def test_garbage_is_a_protocol_error_and_terms_are_sanitised() -> None:
    with pytest.raises(console.ConsoleProtocolError):
        console.Decoder().feed(b"GET / HTTP/1.1\r\n")
    hostile = console.Frame(console.OPEN, b"\0\x18\0\x50" + b"xterm\x1b[2J;rm")
    assert console.term_of(hostile) == "xterm2Jrm"


def test_the_kernel_command_line_switches_it_on() -> None:
    assert enabled("console=ttyS0 husk.debug_console=1 quiet")
    assert enabled("agent.debug_console")
    assert not enabled("console=ttyS0 husk.debug_console=0")
    assert not enabled("console=ttyS0")


async def guest_answers(frames: bytes) -> list[console.Frame]:
    """Run the guest's session on an in-memory stream; every frame it sent until EXITED."""
    host, guest = trio.testing.memory_stream_pair()
    reaper = Reaper()
    received: list[console.Frame] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        nursery.start_soon(Session(guest, reaper).run)
        await host.send_all(frames)
        decoder = console.Decoder()
        with trio.fail_after(20):
            while not received or received[-1].kind != console.EXITED:
                received += decoder.feed(bytes(await host.receive_some()))
        await host.aclose()
        nursery.cancel_scope.cancel()
    return received


async def test_the_shell_runs_on_a_pty_of_the_hosts_size_and_reports_its_exit() -> None:
    typed = b"stty size; tty; exit 3\n"
    frames = await guest_answers(
        console.encode_open(30, 100, "xterm") + console.encode(console.INPUT, typed)
    )
    assert frames[0].kind == console.STARTED
    output = b"".join(f.payload for f in frames if f.kind == console.OUTPUT).decode()
    assert "30 100" in output and "/dev/pts/" in output
    assert console.status_of(frames[-1]) == 3


async def test_a_resize_reaches_the_pty() -> None:
    frames = await guest_answers(
        console.encode_open(24, 80, "")
        + console.encode_resize(50, 132)
        + console.encode(console.INPUT, b"stty size; exit\n")
    )
    assert "50 132" in b"".join(f.payload for f in frames if f.kind == console.OUTPUT).decode()


async def test_husk_exec_side_drives_the_guest_shell_to_its_exit_status() -> None:
    host, guest = trio.testing.memory_stream_pair()
    keyboard_r, keyboard_w = os.pipe()
    screen_r, screen_w = os.pipe()
    os.write(keyboard_w, b"echo hello-from-guest; exit 5\n")
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        nursery.start_soon(Session(guest, reaper).run)
        attachment = Attachment(host, stdin=keyboard_r, stdout=screen_w)
        with trio.fail_after(20):
            outcome = await attachment.run(await attachment.open("dumb"))
        nursery.cancel_scope.cancel()
    os.close(screen_w)
    with os.fdopen(screen_r, "rb") as screen:
        assert b"hello-from-guest" in screen.read()
    os.close(keyboard_w)
    os.close(keyboard_r)
    assert outcome.status == 5 and not outcome.detached


async def test_ctrl_close_bracket_detaches_and_the_guest_hangs_the_shell_up() -> None:
    host, guest = trio.testing.memory_stream_pair()
    keyboard_r, keyboard_w = os.pipe()
    os.write(keyboard_w, b"sleep 1000\n\x1d")
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        session = Session(guest, reaper)
        nursery.start_soon(session.run)
        attachment = Attachment(host, stdin=keyboard_r, stdout=os.open(os.devnull, os.O_WRONLY))
        with trio.fail_after(20):
            outcome = await attachment.run(await attachment.open("dumb"))
            while session.shell is not None:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert outcome.detached and outcome.status is None
    for fd in (keyboard_r, keyboard_w):
        os.close(fd)


async def test_the_console_starts_no_shell_for_a_peer_without_the_secret(tmp_path: Path) -> None:
    """vsock's console: a stranger's OPEN (here: sent where the proof belongs) gets no shell."""
    secret = tmp_path / "agent.secret"
    channel_auth.write_secret(secret)
    host, guest = trio.testing.memory_stream_pair()
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        nursery.start_soon(
            serve_connection, guest, reaper, Gate(secret, channel_auth.DEBUG_CONSOLE)
        )
        challenge = await channel_auth.receive_exactly(host, channel_auth.CHALLENGE_SIZE)
        assert challenge.startswith(channel_auth.MAGIC)
        await host.send_all(console.encode_open(24, 80, "xterm") * 4)
        with trio.fail_after(10):
            assert await host.receive_some() == b""  # closed: no STARTED, no output
        nursery.cancel_scope.cancel()


async def test_the_console_refuses_the_agents_proof_and_serves_its_own(tmp_path: Path) -> None:
    secret = tmp_path / "agent.secret"
    channel_auth.write_secret(secret)
    key = channel_auth.read_secret(secret)
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        gate = Gate(secret, channel_auth.DEBUG_CONSOLE)
        wrong_host, wrong_guest = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_connection, wrong_guest, reaper, gate)
        challenge = await channel_auth.receive_exactly(wrong_host, channel_auth.CHALLENGE_SIZE)
        nonce = challenge[-channel_auth.NONCE_SIZE :]
        agents_proof = channel_auth.mac(key, channel_auth.AGENT, nonce)
        await wrong_host.send_all(channel_auth.MAGIC + bytes([channel_auth.VERSION]) + agents_proof)
        with trio.fail_after(10):
            assert await wrong_host.receive_some() == b""
        host, guest = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_connection, guest, reaper, gate)
        await authenticate(host, key, channel_auth.DEBUG_CONSOLE, "test console")
        keyboard_r, keyboard_w = os.pipe()
        os.write(keyboard_w, b"exit 4\n")
        attachment = Attachment(host, stdin=keyboard_r, stdout=os.open(os.devnull, os.O_WRONLY))
        with trio.fail_after(20):
            outcome = await attachment.run(await attachment.open("dumb"))
        nursery.cancel_scope.cancel()
    assert outcome.status == 4
    for fd in (keyboard_r, keyboard_w):
        os.close(fd)


def test_husk_exec_without_a_debug_console_says_so_in_one_line(tmp_path: Path) -> None:
    state = SandboxState.create(tmp_path / "state", "sb-1", "default")
    state.claim(os.getpid())
    config = tmp_path / "husk.toml"
    config.write_text(f'[runtime]\nstate_dir = "{tmp_path / "state"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "shim", "--config", str(config), "exec", "sb-1"],
        cwd=ROOT, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1
    assert "sandbox sb-1 has no debug console" in proc.stderr
    assert "debug_console = true" in proc.stderr
