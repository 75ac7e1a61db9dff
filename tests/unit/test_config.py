"""configuration.toml: lookup order, defaults, host adjustments, one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shim import config, registry
from shim.errors import ConfigError, NotSupportedError
from shim.host import HostFacts

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    return path


def test_packaged_default_is_the_repository_configuration() -> None:
    assert config.packaged_default().read_bytes() == (ROOT / "configuration.toml").read_bytes()


def test_default_config_selects_qemu_with_tcg_on_a_host_without_usable_kvm(
    tcg_host: HostFacts,
) -> None:
    cfg = config.load(config.packaged_default(), host=tcg_host)
    assert cfg.runtime.hypervisor == "qemu"
    assert cfg.hypervisor["accel"] == "tcg"
    assert cfg.hypervisor["cpu_model"] == "max"


def test_accel_auto_resolves_to_kvm_where_hardware_virtualisation_is_usable(
    kvm_host: HostFacts,
) -> None:
    cfg = config.load(config.packaged_default(), host=kvm_host)
    assert cfg.hypervisor["accel"] == "kvm"
    assert cfg.hypervisor["cpu_model"] == "host"


def test_agent_transport_auto_is_virtio_serial_without_vhost_vsock(tcg_host: HostFacts) -> None:
    assert config.load(config.packaged_default(), host=tcg_host).agent.transport == "virtio-serial"


def test_agent_transport_auto_is_vsock_with_vhost_vsock(kvm_host: HostFacts) -> None:
    assert config.load(config.packaged_default(), host=kvm_host).agent.transport == "vsock"


def test_vsock_transport_on_a_host_without_vhost_vsock_is_an_error(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    path = write(tmp_path, '[agent.husk]\ntransport = "vsock"\n')
    with pytest.raises(ConfigError, match=r"\[agent\.husk\] transport = \"vsock\".*vhost-vsock"):
        config.load(path, host=tcg_host)


def test_missing_sections_take_defaults(tmp_path: Path, tcg_host: HostFacts) -> None:
    cfg = config.load(write(tmp_path, ""), host=tcg_host)
    assert cfg.hypervisor["default_memory"] == 512
    assert cfg.runtime.state_dir == Path("/run/husk")


def test_the_vm_pool_is_off_by_default_and_its_size_is_bounded(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    cfg = config.load(write(tmp_path, ""), host=tcg_host)
    assert cfg.factory.vm_cache_number == 0
    assert cfg.factory.vm_cache_endpoint == Path("/run/husk-vm-cache.sock")
    path = write(tmp_path, "[factory]\nvm_cache_number = -1\n")
    with pytest.raises(ConfigError, match=r"\[factory\] vm_cache_number = -1: expected an integer"):
        config.load(path, host=tcg_host)


def test_bad_value_names_file_key_value_and_what_is_allowed(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    path = write(tmp_path, '[hypervisor.qemu]\ndefault_memory = "lots"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, host=tcg_host)
    message = str(err.value)
    assert message == (
        f'{path}: [hypervisor.qemu] default_memory = "lots": expected an integer of at least 64'
    )
    assert "\n" not in message


def test_value_out_of_choices_lists_the_choices(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, '[hypervisor.qemu]\nshared_fs = "nfs"\n')
    with pytest.raises(ConfigError, match=r'shared_fs = "nfs": expected one of "9p", "virtio-fs"'):
        config.load(path, host=tcg_host)


def test_unknown_key_suggests_the_close_one(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, "[hypervisor.qemu]\ndefualt_vcpus = 2\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'defualt_vcpus' \(did you mean 'default_vcpus'\?\)"
    ):
        config.load(path, host=tcg_host)


def test_unknown_key_without_a_close_one_has_no_suggestion(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    path = write(tmp_path, "[runtime]\nzzz = 1\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, host=tcg_host)
    assert str(err.value).endswith("[runtime] unknown key 'zzz'")


def test_unknown_hypervisor_lists_the_registered_ones(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, '[runtime]\nhypervisor = "firecracker"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, host=tcg_host)
    assert "unknown hypervisor 'firecracker'; registered: " in str(err.value)
    for name in ("qemu", "cloud-hypervisor", "builtin"):
        assert name in str(err.value)


def test_unknown_hypervisor_section_is_an_error(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, "[hypervisor.xen]\npath = '/usr/bin/xl'\n")
    with pytest.raises(ConfigError, match=r"\[hypervisor\.xen\]: unknown hypervisor 'xen'"):
        config.load(path, host=tcg_host)


def test_forcing_kvm_where_it_is_unusable_is_an_error(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, '[hypervisor.qemu]\naccel = "kvm"\n')
    with pytest.raises(ConfigError, match=r'accel = "kvm": KVM present but unusable'):
        config.load(path, host=tcg_host)


def test_cloud_hypervisor_rejects_9p(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, '[hypervisor.cloud-hypervisor]\nshared_fs = "9p"\n')
    with pytest.raises(ConfigError, match=r"\[hypervisor\.cloud-hypervisor\] shared_fs = \"9p\""):
        config.load(path, host=tcg_host)


def test_invalid_toml_is_one_line(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, "[runtime\n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        config.load(path, host=tcg_host)


def test_missing_file_names_it(tmp_path: Path, tcg_host: HostFacts) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: configuration file not found"):
        config.load(tmp_path / "nope.toml", host=tcg_host)


def test_lookup_prefers_explicit_path_over_environment(tmp_path: Path) -> None:
    explicit = tmp_path / "a.toml"
    assert config.locate(explicit, {"HUSK_CONFIG": str(tmp_path / "b.toml")}) == explicit


def test_lookup_uses_husk_config_before_etc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = write(tmp_path, "")
    monkeypatch.setattr(config.loader, "ETC_CONFIG", etc)
    assert config.locate(None, {"HUSK_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")


def test_lookup_uses_etc_before_packaged_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = write(tmp_path, "")
    monkeypatch.setattr(config.loader, "ETC_CONFIG", etc)
    assert config.locate(None, {}) == etc


def test_lookup_falls_back_to_packaged_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.loader, "ETC_CONFIG", tmp_path / "absent.toml")
    assert config.locate(None, {}) == config.packaged_default()


def test_default_file_lists_every_declared_key() -> None:
    raw = tomllib.loads((ROOT / "configuration.toml").read_text())
    assert set(raw["runtime"]) == {k.name for k in config.RUNTIME_KEYS}
    assert set(raw["agent"]["husk"]) == {k.name for k in config.AGENT_KEYS}
    assert set(raw["factory"]) == {k.name for k in config.FACTORY_KEYS}
    declared = {k.name for k in registry.lookup("qemu").keys}
    assert set(raw["hypervisor"]["qemu"]) == declared


def test_default_file_has_sections_only_for_plugins_with_a_driver() -> None:
    raw = tomllib.loads((ROOT / "configuration.toml").read_text())
    assert set(raw["hypervisor"]) == {"qemu", "cloud-hypervisor"}
    declared = {k.name for k in registry.lookup("cloud-hypervisor").keys}
    assert set(raw["hypervisor"]["cloud-hypervisor"]) == declared
    with pytest.raises(NotSupportedError, match="driver"):
        registry.lookup("builtin").create({})


def test_a_shared_fs_the_plugin_cannot_serve_fails_at_load(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    path = write(tmp_path, '[hypervisor.qemu]\nshared_fs = "virtio-fs"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path, host=tcg_host)
    assert str(info.value) == (
        f'{path}: [hypervisor.qemu] shared_fs = "virtio-fs": the qemu plugin does not start '
        'virtiofsd yet; use "9p" or "none"'
    )


def test_default_file_states_every_default() -> None:
    raw = tomllib.loads((ROOT / "configuration.toml").read_text())
    for key in config.RUNTIME_KEYS:
        assert raw["runtime"][key.name] == key.default, key.name
    for key in config.AGENT_KEYS:
        assert raw["agent"]["husk"][key.name] == key.default, key.name
    for key in config.FACTORY_KEYS:
        assert raw["factory"][key.name] == key.default, key.name
    for name in ("qemu", "cloud-hypervisor"):
        for key in registry.lookup(name).keys:
            assert raw["hypervisor"][name][key.name] == key.default, f"{name}: {key.name}"


def test_effective_config_renders_as_toml_that_loads_again(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    cfg = config.load(config.packaged_default(), host=tcg_host)
    again = config.load(write(tmp_path, config.to_toml(cfg)), host=tcg_host)
    assert again.as_dict() == cfg.as_dict()


def test_maxima_zero_mean_the_hosts_cpus_beside_default_vcpus_and_the_hosts_memory(
    tmp_path: Path,
) -> None:
    host = HostFacts(kvm_device=False, kvm_hardware=False, vhost_vsock=False, cpus=2,
                     memory_mib=8000)  # fmt: skip
    cfg = config.load(config.packaged_default(), host=host)
    assert (cfg.hypervisor["default_maxvcpus"], cfg.hypervisor["default_maxmemory"]) == (3, 8000)
    path = write(tmp_path, "[hypervisor.qemu]\ndefault_maxvcpus = 8\ndefault_maxmemory = 2048\n")
    cfg = config.load(path, host=host)
    assert (cfg.hypervisor["default_maxvcpus"], cfg.hypervisor["default_maxmemory"]) == (8, 2048)


def test_a_maximum_below_its_default_names_both(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, "[hypervisor.qemu]\ndefault_memory = 1024\ndefault_maxmemory = 512\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, host=tcg_host)
    assert str(err.value) == (
        f"{path}: [hypervisor.qemu] default_maxmemory = 512: below default_memory (1024); "
        "use 0 for the host's memory"
    )


def test_host_facts_read_cpus_and_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684032 kB\nMemFree:        1 kB\n")
    facts = HostFacts.probe(cpuinfo=tmp_path / "absent", meminfo=meminfo)
    assert facts.memory_mib == 24105 and facts.cpus >= 1


def test_the_default_qemu_section_boots_the_shared_root_image(tcg_host: HostFacts) -> None:
    section = config.load(config.packaged_default(), host=tcg_host).hypervisor
    assert section["image"] == "/var/lib/husk/images/root.img"
    assert section["initrd"] == "/var/lib/husk/images/root-initrd.img"


def test_the_root_image_loader_without_an_image_is_an_error(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    path = write(tmp_path, '[hypervisor.qemu]\nimage = ""\n')
    with pytest.raises(ConfigError, match=r"initrd.*only mounts a root image.*initrd\.img"):
        config.load(path, host=tcg_host)


def test_an_initramfs_only_guest_needs_no_image(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(
        tmp_path, '[hypervisor.qemu]\nimage = ""\ninitrd = "/var/lib/husk/images/initrd.img"\n'
    )
    assert config.load(path, host=tcg_host).hypervisor["image"] == ""


def test_a_root_image_on_microvm_is_an_error(tmp_path: Path, tcg_host: HostFacts) -> None:
    path = write(tmp_path, '[hypervisor.qemu]\nmachine_type = "microvm"\npcie_root_ports = 0\n')
    with pytest.raises(ConfigError, match=r"image.*microvm has no PCI for its virtio-pmem"):
        config.load(path, host=tcg_host)


def test_a_root_image_that_is_not_whole_2_mib_steps_is_an_error(
    tmp_path: Path, tcg_host: HostFacts
) -> None:
    image = tmp_path / "odd.img"
    image.write_bytes(b"\0" * 4097)
    path = write(tmp_path, f'[hypervisor.qemu]\nimage = "{image}"\n')
    with pytest.raises(ConfigError, match=r"image.*4097 bytes.*multiple of 2 MiB"):
        config.load(path, host=tcg_host)
