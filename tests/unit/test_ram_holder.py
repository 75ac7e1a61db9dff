"""The VM template's RAM holder: a memfd nobody can write once it is sealed."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.cli.main import main
from shim.sandbox import cleanup, ram_holder

SIZE = 4 << 20


@pytest.fixture
def record_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ram.json"
    yield path
    assert cleanup.kill_and_wait(ram_holder.holders(path)) == []


def started(record_path: Path, size: int = SIZE) -> ram_holder.Holder:
    holder = ram_holder.start(record_path, size)
    record_path.write_text(holder.record.dump())
    return holder


def write_shared(record: ram_holder.Record, data: bytes) -> None:
    """As the template VM does: its RAM is a shared writable mapping of the memfd."""
    fd = os.open(record.memory, os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as ram:
            ram[: len(data)] = data
    finally:
        os.close(fd)


def wait_gone(record: ram_holder.Record, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while record.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not record.alive()


def test_a_sealed_memfd_opened_read_write_refuses_every_write(record_path: Path) -> None:
    holder = started(record_path)
    write_shared(holder.record, b"template")
    holder.seal()
    fd = os.open(holder.record.memory, os.O_RDWR)  # as QEMU 7.2 opens mem-path
    try:
        for attempt in (
            lambda: os.pwrite(fd, b"PWNED!!!", 0),
            lambda: os.write(fd, b"PWNED!!!"),
            lambda: os.ftruncate(fd, 0),
            lambda: os.posix_fallocate(fd, 0, SIZE * 2),
            lambda: mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
        ):
            with pytest.raises(OSError) as refused:
                attempt()
            assert refused.value.errno == errno.EPERM
        assert os.pread(fd, 8, 0) == b"template" and os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)
    assert ram_holder.problem(holder.record, SIZE) is None


def test_a_clone_still_maps_the_sealed_memfd_private_and_writable(record_path: Path) -> None:
    holder = started(record_path)
    write_shared(holder.record, b"template")
    holder.seal()
    fd = os.open(holder.record.memory, os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as ram:
            assert ram[:8] == b"template"
            ram[:8] = b"my-own!!"  # copy-on-write: the clone's page, not the template's
            assert ram[:8] == b"my-own!!"
        assert os.pread(fd, 8, 0) == b"template"
    finally:
        os.close(fd)


def test_sealing_fails_while_a_shared_writable_mapping_remains(record_path: Path) -> None:
    holder = started(record_path)
    fd = os.open(holder.record.memory, os.O_RDWR)
    try:
        with (
            mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
            pytest.raises(ram_holder.HolderError, match="cannot seal"),
        ):
            holder.seal()
    finally:
        os.close(fd)
    assert wait_gone(holder.record, 5)  # a holder that could not seal does not stay


def test_an_unsealed_holder_exits_when_its_maker_lets_go(record_path: Path) -> None:
    holder = started(record_path)
    assert ram_holder.problem(holder.record, SIZE) == (
        "the template's RAM is not sealed against writes"
    )
    holder.close()
    assert wait_gone(holder.record, 5)


def test_a_sealed_holder_lives_on_without_its_maker_until_its_record_goes(
    record_path: Path,
) -> None:
    holder = started(record_path)
    holder.seal()  # the maker has let go of its pipes
    time.sleep(ram_holder.POLL_SECONDS + 0.5)
    assert holder.record.alive()
    record_path.unlink()
    assert wait_gone(holder.record, ram_holder.POLL_SECONDS * 2 + 1)


def test_the_holder_is_in_its_own_session_in_the_root_dir_holding_only_the_memfd(
    record_path: Path,
) -> None:
    holder = started(record_path)
    holder.seal()
    pid = holder.record.pid
    assert os.getsid(pid) == os.getpgid(pid) != os.getpgid(0)
    assert os.getppid() != int(
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    )  # not this process's child: nothing here has to reap it
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    assert fds.pop(holder.record.fd).startswith("/memfd:husk-template-ram ")
    assert fds == {0: os.devnull, 1: os.devnull, 2: os.devnull}


def test_the_holder_is_found_by_its_record_path(record_path: Path, tmp_path: Path) -> None:
    holder = started(record_path)
    assert ram_holder.holders(record_path) == [holder.record.pid]
    assert ram_holder.holders(tmp_path / "other.json") == []
    holder.close()


def test_a_record_names_a_live_holder_not_a_reused_pid(record_path: Path) -> None:
    holder = started(record_path)
    record = holder.record
    assert ram_holder.Record.load(record_path) == record and record.alive()
    assert not ram_holder.Record(record.pid, record.start + 1, record.fd).alive()
    assert "is gone" in (
        ram_holder.problem(ram_holder.Record(record.pid, record.start + 1, record.fd), SIZE) or ""
    )
    holder.close()


def test_a_memfd_of_another_size_is_not_the_templates_ram(record_path: Path) -> None:
    holder = started(record_path)
    holder.seal()
    assert ram_holder.problem(holder.record, SIZE * 2) == (
        f"the template's RAM is {SIZE} bytes, not {SIZE * 2}"
    )


def test_a_sealed_holder_its_record_forgot_is_an_orphan_an_unsealed_one_never(
    record_path: Path, tmp_path: Path
) -> None:
    making = started(tmp_path / "making.json")  # a template being made: unsealed
    making_path = tmp_path / "making.json"
    making_path.unlink()
    holder = started(record_path)
    holder.seal()
    try:
        assert (holder.record.pid, record_path) not in ram_holder.orphans()
        os.kill(holder.record.pid, signal.SIGSTOP)  # stuck: it cannot notice by itself
        record_path.write_text(ram_holder.Record(1, 1, 1).dump())  # names another process
        orphans = ram_holder.orphans()
        assert (holder.record.pid, record_path) in orphans
        assert all(pid != making.record.pid for pid, _ in orphans)
    finally:
        making.close()


def test_husk_cleanup_kills_a_stuck_holder_its_record_forgot(
    record_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = started(record_path)
    holder.seal()
    os.kill(holder.record.pid, signal.SIGSTOP)
    record_path.unlink()
    cfg = tmp_path / "husk.toml"
    cfg.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\n')
    assert main(["--config", str(cfg), "cleanup", "--dry-run"]) == 0
    assert holder.record.alive()
    assert main(["--config", str(cfg), "cleanup"]) == 0
    assert not holder.record.alive()
    out = capsys.readouterr().out
    assert (
        f"orphan: template RAM holder {holder.record.pid} ({record_path} does not name it)" in out
    )
    assert f"reclaimed: template RAM holder {holder.record.pid}" in out
