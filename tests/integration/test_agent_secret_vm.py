"""The sandbox's channel secret in a real VM: the guest finds it, the host never shows it.

The QEMU driver writes the secret (0600) before QEMU starts and passes the
file as ``-fw_cfg``; the guest reads it where the agent's gate does
(``guest.agent.auth.FW_CFG_SECRET``). A VM template's clone carries its own
secret: ``fw_cfg`` contents are not in the migration stream, so the clone's
guest reads what the clone's QEMU was started with, never the template's.
The guest is read through the debug console (virtio-serial here), and no
process's command line on the host shows the secret in any spelling.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from common.channel_auth import SMBIOS_OEM_PREFIX
from guest.agent.auth import FW_CFG_SECRET
from plugins.qemu.driver import QemuHypervisor
from shim.hypervisor import CLONE, TEMPLATE, TemplateFiles
from shim.sandbox.factory import DEBUG_CONSOLE_PARAM
from tests.integration.guest_shell import guest_shell
from tests.integration.test_qemu_vm import (
    AGENT_MARKER,
    QEMU,
    agent_answers,
    driver,
    image,
    qemu_pids,
    spec_for,
    tap_console,
    wait_console,
    workdir,
)

__all__ = ["image", "workdir"]  # fixtures, used by name

pytestmark = pytest.mark.integration

#: what the shim passes for ``[agent.husk] debug_console = true``
CONSOLE = {"debug_console": True, "kernel_params": DEBUG_CONSOLE_PARAM}


#: the shell line that prints the guest's secret as the agent reads it (fw_cfg, else SMBIOS)
AGENTS_VIEW = (
    "echo SECRET=$(PYTHONPATH=/usr/lib/husk python3 -c 'from guest.agent.auth import *; "
    "print(read_guest_secret(FW_CFG_SECRET).hex())')\n"
)
#: QEMU as a VMM without fw_cfg: the secret becomes an SMBIOS OEM string, as Cloud
#: Hypervisor gives it (this test's QEMU argv then shows it: only the guest's reader is tested)
SMBIOS_QEMU = f"""#!/usr/bin/python3
import os, sys
argv = sys.argv[1:]
at = argv.index("-fw_cfg")
secret = open(argv[at + 1].split("file=", 1)[1], "rb").read().hex()
del argv[at : at + 2]
os.execv("{QEMU}", ["{QEMU}", *argv, "-smbios", "type=11,value={SMBIOS_OEM_PREFIX}" + secret])
"""


async def guest_secret(hv: QemuHypervisor, line: str = "") -> str:
    """The secret the guest's fw_cfg holds, in hex, read by a shell on the debug console."""
    line = line or f"echo SECRET=$(od -An -tx1 -v {FW_CFG_SECRET} | tr -d ' \\n')\n"
    text = await guest_shell(hv, line)
    found = re.search(r"SECRET=([0-9a-f]*)\r?\n", text)
    assert found is not None, text
    return found.group(1)


def spellings(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret)[:40]]


def assert_no_command_line_shows(secret: bytes) -> None:
    """Every process's argv on the host (QEMU's, the shim's, anyone's): no spelling of it."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        for spelling in spellings(secret):
            assert spelling not in argv, f"pid {proc.name} shows the secret: {argv!r}"


#: run as nobody: open each path (a socket is connected to); print what happened to each
_PROBE = r"""
import json, socket, sys
out = {}
for path in sys.argv[1:]:
    try:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        except OSError as e:
            if e.errno != 111 and e.errno != 88:  # not a socket: open it as a file
                raise
            open(path, "rb").read(1)
        out[path] = "reached"
    except OSError as e:
        out[path] = e.strerror
print(json.dumps(out))
"""


def what_nobody_gets(*paths: Path) -> dict[str, str]:
    """Each path as another host user (``nobody``) tries to reach it: the error, or "reached"."""
    result = subprocess.run(
        ["/usr/bin/python3", "-c", _PROBE, *map(str, paths)],
        user=65534, group=65534, capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out: dict[str, str] = json.loads(result.stdout)
    return out


def assert_root_only(path: Path) -> None:
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    directory = path.parent.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == 0


async def test_the_guest_holds_the_sandbox_secret_and_no_command_line_shows_it(
    workdir: Path, image: tuple[Path, Path]
) -> None:
    hv = driver()
    await hv.prepare(spec_for(workdir, image, **CONSOLE))
    secret_file = hv.paths.agent_secret
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        try:
            await hv.start(30)
            assert await agent_answers(hv, 60)
            assert_root_only(secret_file)
            secret = secret_file.read_bytes()
            assert len(secret) == 32
            assert f"file={secret_file}" in (Path("/proc") / str(hv.pid) / "cmdline").read_text()
            assert_no_command_line_shows(secret)
            assert await guest_secret(hv) == secret.hex()
            # virtio-serial has no handshake: its sockets are reachable by root alone
            paths = hv.paths
            sockets = (paths.agent, paths.debug_console, paths.qmp, paths.console, secret_file)
            assert all(p.exists() for p in sockets)
            got = await trio.to_thread.run_sync(lambda: what_nobody_gets(*sockets))
            assert set(got.values()) == {"Permission denied"}, got
        finally:
            with trio.CancelScope(shield=True):
                await hv.destroy()
            nursery.cancel_scope.cancel()
    assert not secret_file.exists()
    assert not qemu_pids(workdir)


async def test_a_clone_holds_its_own_secret_never_its_templates(
    workdir: Path, image: tuple[Path, Path]
) -> None:
    template_dir = workdir / "tpl"
    template_dir.mkdir(mode=0o700)
    files = TemplateFiles(template_dir / "memory", template_dir / "state", role=TEMPLATE)
    template_vm = driver()
    await template_vm.prepare(
        spec_for(workdir, image, template=files, state_dir=template_dir / "vm", **CONSOLE)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, template_vm)
        try:
            await template_vm.start(30)
            await wait_console(template_vm, AGENT_MARKER)
            assert await agent_answers(template_vm, 60)
            template_secret = template_vm.paths.agent_secret.read_bytes()
            assert await guest_secret(template_vm) == template_secret.hex()
            await template_vm.save_template()
        finally:
            with trio.CancelScope(shield=True):
                await template_vm.destroy()
            nursery.cancel_scope.cancel()

    clone = driver()
    await clone.prepare(
        spec_for(workdir, image, template=dataclasses.replace(files, role=CLONE), **CONSOLE)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, clone)
        try:
            await clone.start(60)
            assert await agent_answers(clone, 30)
            clone_secret = clone.paths.agent_secret.read_bytes()
            assert_root_only(clone.paths.agent_secret)
            assert clone_secret != template_secret
            # the clone's guest sees what the clone's QEMU was given, not the migrated template's
            assert await guest_secret(clone) == clone_secret.hex()
            assert_no_command_line_shows(clone_secret)
        finally:
            with trio.CancelScope(shield=True):
                await clone.destroy()
            nursery.cancel_scope.cancel()
    assert not qemu_pids(workdir)


async def test_without_fw_cfg_the_agent_reads_the_secret_from_an_smbios_oem_string(
    workdir: Path, image: tuple[Path, Path]
) -> None:
    """Cloud Hypervisor's way (no KVM here to run it): the guest's reader on a real kernel."""
    qemu = workdir / "qemu-smbios"
    qemu.write_text(SMBIOS_QEMU)
    qemu.chmod(0o700)
    hv = driver(path=str(qemu))
    await hv.prepare(spec_for(workdir, image, **CONSOLE))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tap_console, hv)
        try:
            await hv.start(30)
            assert await agent_answers(hv, 60)
            assert "-fw_cfg" not in (Path("/proc") / str(hv.pid) / "cmdline").read_text()
            secret = hv.paths.agent_secret.read_bytes()
            assert await guest_secret(hv, line=AGENTS_VIEW) == secret.hex()
        finally:
            with trio.CancelScope(shield=True):
                await hv.destroy()
            nursery.cancel_scope.cancel()
