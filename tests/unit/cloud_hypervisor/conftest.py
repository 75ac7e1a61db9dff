"""Fixtures for the Cloud Hypervisor contract tests: a fake ``cloud-hypervisor``
binary (the contract server in a process of its own), a fake ``virtiofsd``, and
a driver with a VM spec on short temp paths (unix socket paths are short)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from plugins.cloud_hypervisor.driver import CloudHypervisor
from shim.host import HostFacts
from shim.hypervisor import SharedFsDevice, VmSpec
from shim.resources import Resource

HERE = Path(__file__).resolve().parent

FAKE_VIRTIOFSD = r"""
import signal, socket, sys, time
path = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--socket-path="))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
sock.listen(1)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
"""


@dataclass
class Vmm:
    """The fake VMM's side of a test: its record of requests and contract violations."""

    record: Path
    resources: list[Resource] = field(default_factory=list)

    def lines(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def requests(self) -> list[tuple[str, str, Any, int, int]]:
        """(method, endpoint, body, fds, status) of every request, in order."""
        return [tuple(line["request"]) for line in self.lines() if "request" in line]  # type: ignore[misc]

    def endpoints(self) -> list[str]:
        return [r[1] for r in self.requests()]

    def body(self, endpoint: str) -> Any:
        return next(r[2] for r in self.requests() if r[1] == endpoint)

    def violations(self) -> list[str]:
        return [line["violation"] for line in self.lines() if "violation" in line]

    def argv(self) -> list[str]:
        return next(line["argv"] for line in self.lines() if "argv" in line)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ch-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kvm() -> HostFacts:
    return HostFacts(kvm_device=True, kvm_hardware=True, vhost_vsock=False, cpus=4, memory_mib=8192)


@pytest.fixture
def vmm(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vmm]:
    """The fake VMM's record; after the test, no request may have broken the contract."""
    record = workdir / "record.jsonl"
    monkeypatch.setenv("FAKE_CH_RECORD", str(record))
    monkeypatch.delenv("FAKE_CH_MODE", raising=False)
    fake = Vmm(record)
    yield fake
    assert fake.violations() == []


def executable(path: Path, script: Path | str) -> Path:
    """A wrapper that runs a Python script with this interpreter, as a binary would run."""
    target = script if isinstance(script, Path) else path.with_suffix(".py")
    if not isinstance(script, Path):
        target.write_text(script)
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {target} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def section(workdir: Path) -> dict[str, Any]:
    return {
        "path": str(executable(workdir / "cloud-hypervisor", HERE / "fake_ch.py")),
        "virtiofsd": str(executable(workdir / "virtiofsd", FAKE_VIRTIOFSD)),
        "kernel_params": "",
        "seccomp": "true",
        "enable_debug": False,
        "boot_timeout": 10.0,
        "stop_timeout": 2.0,
        "api_timeout": 5.0,
    }


@pytest.fixture
def spec(workdir: Path, vmm: Vmm) -> VmSpec:
    kernel, initrd = workdir / "vmlinux", workdir / "initrd.img"
    kernel.write_bytes(b"\x7fELF")
    initrd.write_bytes(b"070701")
    shared = workdir / "shared"
    shared.mkdir()
    return VmSpec(
        sandbox_id="sb1",
        state_dir=workdir / "sb1",
        vcpus=1,
        memory_mib=512,
        kernel=kernel,
        initrd=initrd,
        kernel_params="husk.debug=1",
        shared_fs=SharedFsDevice(id="shared", tag="husk-shared", path=shared, kind="virtio-fs"),
        record=vmm.resources.append,
        max_vcpus=4,
        max_memory_mib=1024,
    )


@pytest.fixture
def driver(section: dict[str, Any], kvm: HostFacts) -> Iterator[CloudHypervisor]:
    ch = CloudHypervisor(section, host=kvm)
    yield ch
    pid = ch.vmm_pid()
    if pid is not None:  # a test that failed half way: leave no VMM behind
        os.killpg(pid, 9)
