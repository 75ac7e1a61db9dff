"""The guest machine helpers, the console log switch and the power-off choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent_proto import agent_pb2
from guest.agent import logs, power, system
from guest.agent.storage import SysfsLayout
from shim.errors import InvalidArgumentError


def test_debug_from_kernel_cmdline() -> None:
    assert logs.debug_from_cmdline("console=ttyS0 husk.debug=1 quiet")
    assert logs.debug_from_cmdline("agent.log=debug")
    assert not logs.debug_from_cmdline("console=ttyS0 husk.debug=0")
    assert not logs.debug_from_cmdline("")


def test_power_off_is_only_chosen_as_pid_1() -> None:
    assert power.resolve("auto") == ("poweroff" if os.getpid() == 1 else "exit")
    assert power.resolve("exit") == "exit"
    with pytest.raises(ValueError, match="reboot"):
        power.resolve("reboot")


def test_online_cpus_and_memory(tmp_path: Path) -> None:
    cpus = tmp_path / "devices" / "system" / "cpu"
    (cpus / "cpu0").mkdir(parents=True)
    for n in (1, 2):
        (cpus / f"cpu{n}").mkdir()
        (cpus / f"cpu{n}" / "online").write_text("0\n")
    mem = tmp_path / "devices" / "system" / "memory" / "memory8"
    mem.mkdir(parents=True)
    (mem / "state").write_text("offline\n")
    layout = SysfsLayout(sys=tmp_path)
    assert system.count_online_cpus(layout) == 1
    assert system.online_cpus(layout) == 2
    assert (cpus / "cpu2" / "online").read_text() == "1"
    assert system.online_memory(layout) == 1
    assert (mem / "state").read_text() == "online"


def test_copy_file_stays_below_its_root(tmp_path: Path) -> None:
    for path in ("relative", "/etc/x", f"{tmp_path}/../x", str(tmp_path)):
        with pytest.raises(InvalidArgumentError):
            system.copy_file(agent_pb2.CopyFileRequest(path=path), tmp_path)
    target = tmp_path / "a" / "b"
    request = agent_pb2.CopyFileRequest(path=str(target), data=b"x", file_size=1, uid=-1, gid=-1)
    system.copy_file(request, tmp_path)
    assert target.read_bytes() == b"x"


def test_the_agent_protects_itself_from_the_oom_killer(tmp_path: Path) -> None:
    (tmp_path / "oom_score_adj").write_text("0\n")
    system.protect_from_oom_killer(tmp_path)
    assert (tmp_path / "oom_score_adj").read_text() == "-1000"


def test_protection_that_cannot_be_had_is_only_a_warning(tmp_path: Path) -> None:
    system.protect_from_oom_killer(tmp_path / "absent")
