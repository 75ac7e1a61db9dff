"""The Cloud Hypervisor driver's virtiofsd command line against the real daemon on this
host (QEMU's, from Debian 12's qemu-system-common): the one part of the plugin's
host side that runs here without Cloud Hypervisor or hardware KVM."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from plugins.cloud_hypervisor import virtiofsd
from plugins.cloud_hypervisor.plugin import PLUGIN
from shim.host import HostFacts
from shim.hypervisor import SharedFsDevice

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd sandboxes itself: needs root"),
]


def installed_virtiofsd() -> str:
    """What ``virtiofsd = "auto"`` resolves to on this host."""
    values = PLUGIN.adjust({"virtiofsd": "auto"}, HostFacts.probe())
    return str(values["virtiofsd"])


async def test_the_plugins_command_line_starts_the_hosts_virtiofsd() -> None:
    binary = installed_virtiofsd()
    assert Path(binary).is_file(), f"no virtiofsd at {binary}"
    with tempfile.TemporaryDirectory(prefix="chfs-", dir="/tmp") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        sock, log = Path(tmp) / "fs.sock", Path(tmp) / "virtiofsd.log"
        device = SharedFsDevice("shared", "husk-shared", share, kind="virtio-fs")
        process = await virtiofsd.start(binary, device, sock, log, timeout=10.0)
        try:
            assert process.alive and sock.is_socket()
        finally:
            await process.terminate(5.0)
        assert not process.alive
