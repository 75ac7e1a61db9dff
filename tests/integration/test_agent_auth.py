"""The agent answers only its own shim: another host user who reaches its socket gets nothing.

The real agent runs in host mode (``python -m guest.agent --host-mode``) on a
unix socket this test makes world-accessible, standing in for a vsock port
(which every host process can reach). An attacker process running as
``nobody`` connects and sends ttrpc requests — ``Health.Check`` and a
``CreateContainer`` whose ``Root.Path`` is ``/`` (root in the guest) — with
no handshake, then with a wrong secret; it must get the agent's challenge and
nothing else. The shim's own client, proving the secret, is served.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agent_proto import agent_pb2, health_pb2
from common import channel_auth
from shim.agent.client import AgentClient
from shim.agent.transport import authenticate
from tests.integration.test_agent_host import REPO, running_agent
from ttrpc.envelope import encode_request
from ttrpc.frame import MessageType, encode_header

NOBODY = 65534
#: the attacker: stdlib only (it runs as nobody, who cannot read the repo's venv under /root)
ATTACKER = r"""
import hashlib, hmac, json, os, socket, sys
path, mode, request = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
out = {"uid": os.getuid()}
try:
    open(sys.argv[4], "rb").read()
    out["read_secret"] = True
except OSError as e:
    out["read_secret"] = e.strerror
s = socket.socket(socket.AF_UNIX)
s.settimeout(15)
s.connect(path)
if mode == "wrong-secret":
    challenge = b""
    while len(challenge) < 38:
        challenge += s.recv(38 - len(challenge))
    guess = os.urandom(32)
    mac = hmac.new(guess, b"husk channel auth v1" + challenge[5:6] + challenge[6:], hashlib.sha256)
    s.sendall(b"HUSK\x01" + mac.digest())
    out["challenge"] = challenge.hex()
try:
    s.sendall(request)
except OSError as e:
    out["send_error"] = str(e)
got = b""
try:
    while chunk := s.recv(65536):
        got += chunk
except OSError as e:
    out["error"] = str(e)
out["received"] = got.hex()
print(json.dumps(out))
"""

pytestmark = [pytest.mark.integration]


def request_frame(stream_id: int, service: str, method: str, payload: bytes) -> bytes:
    body = encode_request(service, method, payload)
    return encode_header(len(body), stream_id, MessageType.REQUEST) + body


def attack_requests() -> bytes:
    """Health.Check, then CreateContainer with the host's / as the container's root."""
    create = agent_pb2.CreateContainerRequest(container_id="evil", exec_id="evil")
    create.OCI.Root.Path = "/"
    create.OCI.Process.Args.extend(["/bin/sh", "-c", "id > /tmp/pwned"])
    return request_frame(
        1, "grpc.Health", "Check", health_pb2.CheckRequest().SerializeToString()
    ) + request_frame(3, "grpc.AgentService", "CreateContainer", create.SerializeToString())


def attack_as_nobody(sock: str, mode: str, secret_file: str) -> dict[str, object]:
    """Run the attacker as another host user; what it could read and what it received."""
    result = subprocess.run(
        ["/usr/bin/python3", "-c", ATTACKER, sock, mode, attack_requests().hex(), secret_file],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr.decode()
    out: dict[str, object] = json.loads(result.stdout)
    assert out["uid"] == NOBODY
    return out


def open_to_everyone(path: str) -> None:
    """The agent's socket and its dir reachable by any user, as a vsock port is."""
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o777)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another user: needs root")
async def test_another_user_without_the_secret_gets_only_the_challenge() -> None:
    async with running_agent() as a:
        sock = str(a.base / "agent.sock")
        open_to_everyone(sock)
        out = await trio.to_thread.run_sync(
            attack_as_nobody, sock, "no-handshake", str(a.base / "agent.secret")
        )
        received = bytes.fromhex(str(out["received"]))
        # the challenge, then the connection closed: no ttrpc answer to either request
        assert len(received) == channel_auth.CHALLENGE_SIZE, received
        assert received.startswith(channel_auth.MAGIC)
        assert out["read_secret"] == "Permission denied"
        assert not (a.shared / "evil").exists()
        assert not (a.base / "state" / "bundles" / "evil").exists()
        # the agent still serves its shim
        resp = await a.health.Check(health_pb2.CheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        log = (a.base / "agent.log").read_text()
        assert "refused a connection from a unix socket peer: a wrong or garbled proof" in log


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another user: needs root")
async def test_another_user_with_a_wrong_secret_is_refused_without_an_answer() -> None:
    async with running_agent() as a:
        sock = str(a.base / "agent.sock")
        open_to_everyone(sock)
        out = await trio.to_thread.run_sync(
            attack_as_nobody, sock, "wrong-secret", str(a.base / "agent.secret")
        )
        assert bytes.fromhex(str(out["challenge"])).startswith(channel_auth.MAGIC)
        assert out["received"] == ""  # no ACCEPTED byte, no ttrpc frame: closed
        assert not (a.shared / "evil").exists()


async def test_the_shims_client_with_the_right_secret_is_served() -> None:
    async with running_agent() as a:
        secret_file = a.base / "agent.secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        stream = await trio.open_unix_socket(str(a.base / "agent.sock"))
        secret = channel_auth.read_secret(secret_file)
        await authenticate(stream, secret, channel_auth.AGENT, "the test agent")
        async with AgentClient.open(stream, request_timeout=10) as client:
            resp = await client.check()
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_agent_without_a_secret_refuses_its_unix_socket(tmp_path: Path) -> None:
    sock, log = tmp_path / "agent.sock", tmp_path / "agent.log"
    argv = [
        sys.executable, "-m", "guest.agent", "--host-mode", "--listen", f"unix:{sock}",
        "--secret-file", str(tmp_path / "absent"), "--state-dir", str(tmp_path / "state"),
        "--shared-dir", str(tmp_path / "shared"), "--cgroup-parent", "/husk-test-nosecret",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(15):
            while not sock.exists():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            with trio.fail_after(10):
                received = await channel_auth.receive_exactly(stream, 64)
        assert received == b""  # not even a challenge: nothing to check a proof against
        text = log.read_text()
        assert text.count("every vsock and unix connection is refused") == 1, text
        assert "refused a connection from a unix socket peer: cannot read" in text, text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
