"""``--listen`` parsing and channel detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest.agent.channel import ListenAddress, detect, parse_listen


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
