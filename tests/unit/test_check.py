"""`husk check`: findings in words and JSON, and the exit decision."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from shim import config
from shim.cli import check
from shim.host import HostFacts


def fake_runner(outputs: dict[str, str]) -> check.Runner:
    def run(argv: Sequence[str]) -> str | None:
        key = Path(argv[0]).name + " " + " ".join(argv[1:])
        for prefix, out in outputs.items():
            if key.startswith(prefix):
                return out
        return None

    return run


QEMU_OK = {
    "qemu-system-x86_64 --version": "QEMU emulator version 7.2.9 (Debian 1:7.2+dfsg-7)\n",
    "qemu-system-x86_64 -nodefaults": 'name "virtio-9p-pci"\nname "vhost-user-fs-pci"\n',
    "containerd --version": "containerd github.com/containerd/containerd 1.6.20~ds1 \n",
}


def image_config(tmp_path: Path, host: HostFacts, *, with_image: bool) -> config.Config:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    if with_image:
        kernel.write_bytes(b"k")
        initrd.write_bytes(b"i")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[runtime]\nimage_dir = "{tmp_path}"\n'
        f'[hypervisor.qemu]\npath = "{binary}"\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
    )
    return config.load(path, host=host)


def test_paravirtual_kvm_is_reported_as_unusable_with_tcg(tcg_host: HostFacts) -> None:
    assert tcg_host.kvm_reason.startswith("KVM present but unusable, TCG will be used")


def test_missing_vhost_vsock_is_named(tmp_path: Path, tcg_host: HostFacts) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=True)
    text = check.render_text(check.probe(cfg, tcg_host, fake_runner(QEMU_OK)))
    assert "missing (/dev/vhost-vsock): the agent will use virtio-serial" in text


def test_sandbox_can_start_under_tcg_when_qemu_and_image_are_present(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=True)
    findings = check.probe(cfg, tcg_host, fake_runner(QEMU_OK))
    assert check.can_start(findings)
    sandbox = next(f for f in findings if f.name == "sandbox")
    assert "(tcg), agent over virtio-serial" in sandbox.detail


def test_missing_guest_image_blocks_a_sandbox_and_says_how_to_fix(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=False)
    findings = check.probe(cfg, tcg_host, fake_runner(QEMU_OK))
    assert not check.can_start(findings)
    assert "run `husk image build`" in next(f for f in findings if f.name == "sandbox").detail


def test_qemu_version_and_device_support_are_reported(tmp_path: Path, tcg_host: HostFacts) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=True)
    by_name = {f.name: f for f in check.probe(cfg, tcg_host, fake_runner(QEMU_OK))}
    assert "version 7.2.9" in by_name["qemu"].detail
    assert by_name["9p"].ok and by_name["virtio-fs"].ok
    assert by_name["containerd"].detail == "version 1.6.20~ds1"
    assert not by_name["cloud-hypervisor"].ok


def test_json_report_carries_overall_verdict(tmp_path: Path, tcg_host: HostFacts) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=False)
    report = json.loads(check.render_json(check.probe(cfg, tcg_host, fake_runner(QEMU_OK))))
    assert report["ok"] is False
    assert {c["name"] for c in report["checks"]} >= {"kvm", "vhost-vsock", "qemu", "guest image"}


def test_a_plugin_without_a_driver_cannot_start_even_on_a_kvm_host(tmp_path: Path) -> None:
    kvm = HostFacts(kvm_device=True, kvm_hardware=True, vhost_vsock=True)
    path = tmp_path / "builtin.toml"
    path.write_text(
        '[runtime]\nhypervisor = "builtin"\n'
        f'[hypervisor.builtin]\nkernel = "{sys.executable}"\ninitrd = "{sys.executable}"\n'
    )
    cfg = config.load(path, host=kvm)
    findings = check.probe(cfg, kvm, fake_runner(QEMU_OK))
    sandbox = next(f for f in findings if f.name == "sandbox")
    assert not check.can_start(findings)
    assert sandbox.detail == (
        "cannot start: hypervisor 'builtin' does not support starting a sandbox: "
        "no driver for the built-in VMM exists yet"
    )


def cloud_hypervisor_config(tmp_path: Path, host: HostFacts) -> config.Config:
    path = tmp_path / "ch.toml"
    path.write_text(
        '[runtime]\nhypervisor = "cloud-hypervisor"\n'
        f'[hypervisor.cloud-hypervisor]\npath = "{sys.executable}"\n'
        f'kernel = "{sys.executable}"\ninitrd = "{sys.executable}"\n'
        f'virtiofsd = "{sys.executable}"\n'
    )
    return config.load(path, host=host)


def test_cloud_hypervisor_can_start_on_a_kvm_host_with_its_binaries(tmp_path: Path) -> None:
    kvm = HostFacts(kvm_device=True, kvm_hardware=True, vhost_vsock=False)
    cfg = cloud_hypervisor_config(tmp_path, kvm)
    ch_ok = {**QEMU_OK, Path(sys.executable).name: "cloud-hypervisor v48.0.0\n"}
    by_name = {f.name: f for f in check.probe(cfg, kvm, fake_runner(ch_ok))}
    assert by_name["sandbox"].ok
    assert by_name["sandbox"].detail.endswith("agent over hybrid-vsock")
    assert by_name["cloud-hypervisor"].detail == f"{sys.executable}, version 48.0.0"


def test_cloud_hypervisor_without_hardware_kvm_cannot_start_and_check_says_why(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    cfg = cloud_hypervisor_config(tmp_path, tcg_host)
    findings = check.probe(cfg, tcg_host, fake_runner(QEMU_OK))
    by_name = {f.name: f for f in findings}
    assert not check.can_start(findings)
    assert by_name["sandbox"].detail == (
        "cannot start: Cloud Hypervisor needs hardware KVM: /dev/kvm is there but the CPU "
        "reports no hardware virtualisation (vmx/svm)"
    )
    assert by_name["vhost-vsock"].detail == (
        "missing (/dev/vhost-vsock): the agent will use hybrid-vsock"
    )
    assert not by_name["cloud-hypervisor"].ok
    assert by_name["cloud-hypervisor"].detail.endswith(
        "no sandbox can start with it here: Cloud Hypervisor needs hardware KVM: /dev/kvm is "
        "there but the CPU reports no hardware virtualisation (vmx/svm)"
    )


def test_how_clones_hold_the_template_ram_is_reported(tmp_path: Path, tcg_host: HostFacts) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=True)
    qemu_8_2 = {
        "qemu-system-x86_64 -nodefaults -machine none -object": "  readonly=<bool>\n  rom=<x>\n",
        **QEMU_OK,
    }
    for outputs, words in ((QEMU_OK, "read-write"), (qemu_8_2, "read-only")):
        by_name = {f.name: f for f in check.probe(cfg, tcg_host, fake_runner(outputs))}
        finding = by_name["template-ram"]
        assert finding.ok and not finding.blocking
        assert words in finding.detail and "write-sealed memfd" in finding.detail


def test_a_host_without_iptables_is_told_that_port_forward_is_unavailable(
    tmp_path: Path, tcg_host: HostFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = image_config(tmp_path, tcg_host, with_image=True)
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name: None if name == "iptables" else real_which(name)
    )
    findings = check.probe(cfg, tcg_host, fake_runner(QEMU_OK))
    iptables = next(f for f in findings if f.name == "iptables")
    assert not iptables.ok and "port-forward into pods is unavailable" in iptables.detail
    assert check.can_start(findings)  # a pod still runs, unforwarded
