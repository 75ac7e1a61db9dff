"""``--listen`` parsing and channel detection."""

from __future__ import annotations

import os
import tty
from pathlib import Path

import pytest
import trio

from agent_proto import health_pb2
from guest.agent import build_server
from guest.agent.channel import ListenAddress, detect, parse_listen, serve_serial
from tests.unit.test_agent_service import make_service
from ttrpc.client import Client


def test_parse_listen() -> None:
    assert parse_listen("vsock") == [ListenAddress("vsock", port=1024)]
    assert parse_listen("vsock:2048") == [ListenAddress("vsock", port=2048)]
    assert parse_listen("serial") == [
        ListenAddress("serial", path="/dev/virtio-ports/agent.channel.0")
    ]
    assert parse_listen("unix:/tmp/a.sock") == [ListenAddress("unix", path="/tmp/a.sock")]
    for bad in ("unix:", "tcp:1", "vsock:x"):
        with pytest.raises(ValueError, match="--listen"):
            parse_listen(bad)


def test_detect_prefers_every_channel_present(tmp_path: Path) -> None:
    vsock, serial = tmp_path / "vsock", tmp_path / "agent.channel.0"
    assert detect(vsock, serial) == [ListenAddress("serial", path=str(serial))]
    vsock.touch()
    assert detect(vsock, serial) == [ListenAddress("vsock")]
    serial.touch()
    assert detect(vsock, serial) == [
        ListenAddress("vsock"),
        ListenAddress("serial", path=str(serial)),
    ]


async def test_serial_port_serves_ttrpc_and_survives_a_hangup(tmp_path: Path) -> None:
    """A raw pty stands in for the virtio-serial port: one byte stream, no connections."""
    server = build_server(make_service(tmp_path))
    master, slave = os.openpty()
    tty.setraw(slave)
    path = Path(os.ttyname(slave))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_serial, server, path)
        os.close(slave)  # the agent holds its own open of the port
        async with Client.open(trio.lowlevel.FdStream(master)) as client:
            health = client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"])
            with trio.fail_after(5):
                check = await health.Check(health_pb2.CheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        # The host end is gone: the agent reads EIO, and keeps trying to reopen.
        await trio.sleep(0.3)
        assert server.connection_count == 0
        nursery.cancel_scope.cancel()
