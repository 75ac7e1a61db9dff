"""containerd's stdio URIs as runc's shim reads them: fifo paths, file://, binary:// loggers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from shim.containerd import outputs as outputs_mod
from shim.containerd.outputs import (
    BinaryOutputs,
    FileOutputs,
    OutputsRequest,
    open_outputs,
)
from shim.containerd.stdio import FifoOutputs, StdioPaths
from shim.errors import FailedPreconditionError, InvalidArgumentError
from shim.resources import Resource, process_alive

LOGGER = """#!/bin/sh
# a containerd logging binary: fd 3 stdout, fd 4 stderr, fd 5 ready
out=$(dirname "$0")
echo $$ > "$out/pid"
env > "$out/env"
printf '%s|' "$@" > "$out/args"
cat <&3 5>&- > "$out/stdout" &
cat <&4 5>&- > "$out/stderr" &
exec 5>&-  # ready (the cats must not hold fd 5 either)
wait
"""


class Ledger:
    """The sandbox record as the outputs see it."""

    def __init__(self) -> None:
        self.live: list[Resource] = []

    def record(self, resource: Resource) -> None:
        self.live.append(resource)

    def forget(self, resource: Resource) -> None:
        self.live.remove(resource)


def request(stdout: str, ledger: Ledger | None = None, stderr: str | None = None) -> OutputsRequest:
    ledger = ledger or Ledger()
    return OutputsRequest(
        stdio=StdioPaths("", stdout, stdout if stderr is None else stderr),
        process_id="c1",
        namespace="ns1",
        label="container c1",
        record=ledger.record,
        forget=ledger.forget,
    )


def script(tmp_path: Path, text: str, name: str = "logger") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


async def wait_for(path: Path) -> str:
    with trio.fail_after(10):
        while not path.exists() or not path.read_text():
            await trio.sleep(0.02)
    return path.read_text()


async def test_a_plain_path_and_fifo_scheme_are_containerd_fifos() -> None:
    for uri in ("/run/containerd/fifo/1/c1-stdout", "fifo:///run/x", ""):
        assert isinstance(await open_outputs(request(uri)), FifoOutputs)


async def test_an_unknown_scheme_is_refused_in_one_line() -> None:
    with pytest.raises(InvalidArgumentError, match="scheme 'http' is not supported") as err:
        await open_outputs(request("http://example.org/log"))
    assert "\n" not in str(err.value)


async def test_file_uri_creates_the_file_and_appends_both_streams(tmp_path: Path) -> None:
    log = tmp_path / "new-dir" / "c1.log"
    outputs = await open_outputs(request(f"file://{log}"))
    assert isinstance(outputs, FileOutputs)
    assert stat.S_IMODE(log.stat().st_mode) == 0o644 and log.read_bytes() == b""
    out, err = await outputs.open("stdout"), await outputs.open("stderr")
    assert out is not None and err is not None
    await out.send_all(b"to stdout\n")
    await err.send_all(b"to stderr\n")
    await out.send_all(b"stdout again\n")
    await out.aclose()
    await err.aclose()
    assert log.read_bytes() == b"to stdout\nto stderr\nstdout again\n"


async def test_binary_logger_gets_fds_3_4_env_and_query_args(tmp_path: Path) -> None:
    logger = script(tmp_path, LOGGER)
    ledger = Ledger()
    outputs = await open_outputs(request(f"binary://{logger}?--tag=web&-v&--tag=ignored", ledger))
    assert isinstance(outputs, BinaryOutputs)
    assert [r.pid for r in ledger.live] == [outputs.logger.pid]
    out, err = await outputs.open("stdout"), await outputs.open("stderr")
    assert out is not None and err is not None
    await out.send_all(b"hello out\n")
    await err.send_all(b"hello err\n")
    await out.aclose()
    await err.aclose()
    assert await wait_for(tmp_path / "stdout") == "hello out\n"
    assert await wait_for(tmp_path / "stderr") == "hello err\n"
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert env["CONTAINER_ID"] == "c1" and env["CONTAINER_NAMESPACE"] == "ns1"
    assert "HOME" not in env  # its whole environment is the two variables (sh adds PWD)
    assert (tmp_path / "args").read_text() == "--tag|web|-v||"
    await outputs.aclose()
    assert not process_alive(outputs.logger.pid) and ledger.live == []


async def test_deleting_kills_a_logger_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs_mod, "LOGGER_TERM_TIMEOUT", 0.3)
    stubborn = script(tmp_path, "#!/bin/sh\ntrap '' TERM\nexec 5>&-\nwhile :; do sleep 1; done\n")
    ledger = Ledger()
    outputs = await open_outputs(request(f"binary://{stubborn}", ledger))
    await outputs.aclose()
    assert isinstance(outputs, BinaryOutputs)
    assert outputs.logger.status == -9 and ledger.live == []


async def test_a_logger_that_exits_before_ready_fails_and_leaves_nothing(tmp_path: Path) -> None:
    quitter = script(tmp_path, "#!/bin/sh\necho dying >&2\nexit 3\n")
    ledger = Ledger()
    zombies = zombie_children()  # other tests' children are not this test's business
    with pytest.raises(FailedPreconditionError, match="exited with status 3 before") as err:
        await open_outputs(request(f"binary://{quitter}", ledger))
    assert "\n" not in str(err.value) and ledger.live == []
    assert zombie_children() == zombies  # the logger was reaped


def zombie_children() -> list[tuple[int, str]]:
    """This process's children that exited and were not reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append((int(entry), stat.split()[1]))
    return found


async def test_a_missing_logger_binary_fails_in_one_line(tmp_path: Path) -> None:
    ledger = Ledger()
    with pytest.raises(InvalidArgumentError, match="cannot start: No such file") as err:
        await open_outputs(request(f"binary://{tmp_path}/nope?x=1", ledger))
    assert "\n" not in str(err.value) and ledger.live == []


async def test_a_logger_that_never_gets_ready_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs_mod, "LOGGER_READY_TIMEOUT", 0.3)
    sleeper = script(tmp_path, "#!/bin/sh\nexec sleep 100\n")
    ledger = Ledger()
    with pytest.raises(FailedPreconditionError, match="did not close fd 5"):
        await open_outputs(request(f"binary://{sleeper}", ledger))
    assert ledger.live == []
