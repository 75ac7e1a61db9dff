"""The ``[hypervisor.cloud-hypervisor]`` section: keys, one-line errors, and a sandbox
start on a host without Cloud Hypervisor or hardware KVM."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.cloud_hypervisor.driver import CloudHypervisor
from plugins.cloud_hypervisor.plugin import VIRTIOFSD_PLACES
from shim import config, registry
from shim.errors import ConfigError, HostError
from shim.host import HostFacts
from shim.sandbox import factory


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_the_registry_makes_a_driver_for_the_section(tcg_host: HostFacts) -> None:
    plugin = registry.lookup("cloud-hypervisor")
    assert isinstance(plugin.create({}), CloudHypervisor)
    assert plugin.agent_transports(tcg_host) == ("hybrid-vsock",)


def test_a_bad_value_is_one_line_naming_the_key(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, '[hypervisor.cloud-hypervisor]\nseccomp = "off"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path, host=tcg_host)
    assert str(info.value).startswith(f'{path}: [hypervisor.cloud-hypervisor] seccomp = "off": ')
    assert "\n" not in str(info.value)


def test_an_unknown_key_is_refused(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, "[hypervisor.cloud-hypervisor]\nhotplug_method = 1\n")
    with pytest.raises(ConfigError, match=r"\[hypervisor.cloud-hypervisor\] unknown key"):
        config.load(path, host=tcg_host)


def test_a_sandbox_start_here_fails_in_one_line_naming_what_is_missing(
    tmp_path: Path, tcg_host: HostFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        f'[runtime]\nhypervisor = "cloud-hypervisor"\nstate_dir = "{tmp_path}/run"\n'
        '[hypervisor.cloud-hypervisor]\npath = "/nonexistent/cloud-hypervisor"\n'
        f'kernel = "{tmp_path}/c.toml"\ninitrd = ""\nshared_fs = "none"\n',
    )
    cfg = config.load(path, host=tcg_host)
    monkeypatch.setattr(factory.HostFacts, "probe", staticmethod(lambda: tcg_host))
    with pytest.raises(HostError) as info:
        factory.sandbox_factory(cfg, "default")("sb1", None, {})
    assert str(info.value) == (
        "cannot start sandbox sb1: cloud-hypervisor binary /nonexistent/cloud-hypervisor not "
        "found or not executable (key 'path'); Cloud Hypervisor needs hardware KVM: /dev/kvm "
        "is there but the CPU reports no hardware virtualisation (vmx/svm)"
    )
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_virtiofsd_is_required_only_for_virtio_fs(tmp_path: Path, kvm_host: HostFacts) -> None:
    plugin = registry.lookup("cloud-hypervisor")
    section = {"path": "/bin/sh", "virtiofsd": "/nonexistent/virtiofsd"}
    assert plugin.unmet_requirements({**section, "shared_fs": "none"}, kvm_host) == []
    assert plugin.unmet_requirements({**section, "shared_fs": "virtio-fs"}, kvm_host) == [
        "virtiofsd binary /nonexistent/virtiofsd not found or not executable (key 'virtiofsd')"
    ]


def test_virtiofsd_auto_is_the_first_installed_daemon(tcg_host: HostFacts) -> None:
    plugin = registry.lookup("cloud-hypervisor")
    resolved = plugin.adjust({"virtiofsd": "auto"}, tcg_host)["virtiofsd"]
    installed = [p for p in VIRTIOFSD_PLACES if Path(p).is_file()]
    assert resolved == (installed[0] if installed else VIRTIOFSD_PLACES[0])
    assert plugin.adjust({"virtiofsd": "/opt/vfsd"}, tcg_host)["virtiofsd"] == "/opt/vfsd"
