"""The VM template's bookkeeping: when it is current, stale or damaged (no VM here)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import config
from shim.host import HostFacts
from shim.hypervisor import TEMPLATE, Hypervisor
from shim.sandbox import factory, ram_holder
from shim.sandbox import template as template_module
from shim.sandbox.boot_slots import BootSlots
from shim.sandbox.template import VmTemplate


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    for name in ("vmlinux", "root-initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "root.img").write_bytes(bytes(2 << 20))
    path = tmp_path / "husk.toml"
    path.write_text(
        f'[runtime]\nstate_dir = "{tmp_path}/state"\n'
        f'[factory]\nenable_template = true\ntemplate_path = "{tmp_path}/tpl"\n'
        f'[hypervisor.qemu]\nkernel = "{tmp_path}/vmlinux"\n'
        f'initrd = "{tmp_path}/root-initrd.img"\nimage = "{tmp_path}/root.img"\n'
    )
    host = HostFacts(kvm_device=False, kvm_hardware=False, vhost_vsock=False)
    return config.load(path, host=host)


def template(cfg: config.Config) -> VmTemplate:
    def no_vm() -> Hypervisor:
        raise AssertionError("no VM in a unit test")

    return VmTemplate(
        cfg, no_vm, lambda state: factory.vm_spec(cfg, state), BootSlots(cfg.runtime.state_dir, 1)
    )


@pytest.fixture(autouse=True)
def no_holder_left(cfg: config.Config) -> Iterator[None]:
    yield
    assert template(cfg).destroy() == []


def made(t: VmTemplate, memory_mib: int = 512, seal: bool = True) -> ram_holder.Holder:
    """Files as a made template leaves them, and its RAM's holder."""
    t.path.mkdir(parents=True, exist_ok=True)
    holder = ram_holder.start(t.path / "ram.json", memory_mib << 20)
    (t.path / "ram.json").write_text(holder.record.dump())
    if seal:
        holder.seal()
    (t.path / "state").write_bytes(b"state")
    manifest = {"digest": t.digest(), "memory_mib": memory_mib, "created": 1.0}
    (t.path / "template.json").write_text(json.dumps(manifest))
    return holder


def test_a_template_is_usable_when_made_for_this_configuration(cfg: config.Config) -> None:
    t = template(cfg)
    assert t.problem() == f"no template in {t.path}"
    made(t)
    assert t.problem() is None and t.status().ready


def test_a_rebuilt_kernel_makes_the_template_stale(cfg: config.Config, tmp_path: Path) -> None:
    t = template(cfg)
    made(t)
    (tmp_path / "vmlinux").write_bytes(b"a new kernel")
    assert "stale" in (t.problem() or "")


def test_a_rebuilt_root_image_makes_the_template_stale(cfg: config.Config, tmp_path: Path) -> None:
    t = template(cfg)
    made(t)
    (tmp_path / "root.img").write_bytes(bytes(4 << 20))
    assert "stale" in (t.problem() or "")


def test_another_vm_shape_makes_the_template_stale(cfg: config.Config, tmp_path: Path) -> None:
    t = template(cfg)
    made(t)
    (tmp_path / "husk.toml").write_text(
        (tmp_path / "husk.toml").read_text() + "default_memory = 1024\n"
    )
    host = HostFacts(kvm_device=False, kvm_hardware=False, vhost_vsock=False)
    bigger = template(config.load(tmp_path / "husk.toml", host=host))
    assert "stale" in (bigger.problem() or "")


def test_timeouts_do_not_change_the_vm_shape(cfg: config.Config, tmp_path: Path) -> None:
    t = template(cfg)
    made(t)
    (tmp_path / "husk.toml").write_text(
        (tmp_path / "husk.toml").read_text() + "boot_timeout = 99.0\n"
    )
    host = HostFacts(kvm_device=False, kvm_hardware=False, vhost_vsock=False)
    assert template(config.load(tmp_path / "husk.toml", host=host)).problem() is None


def test_a_translation_cache_bound_does_not_change_the_vm_shape(
    cfg: config.Config, tmp_path: Path
) -> None:
    t = template(cfg)
    made(t)
    (tmp_path / "husk.toml").write_text((tmp_path / "husk.toml").read_text() + "tcg_tb_size = 64\n")
    host = HostFacts(kvm_device=False, kvm_hardware=False, vhost_vsock=False)
    assert template(config.load(tmp_path / "husk.toml", host=host)).problem() is None


def test_a_changed_hypervisor_plugin_makes_the_template_stale(
    cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an upgrade that starts QEMU with another device set cannot restore the old
    # template's state: it must be made again, not cloned (and fail) forever
    t = template(cfg)
    made(t)
    monkeypatch.setattr(template_module, "plugin_code_digest", lambda name: "another build")
    assert "stale" in (t.problem() or "")


def test_the_plugins_code_digest_is_its_package_source() -> None:
    first = template_module.plugin_code_digest("qemu")
    assert first == template_module.plugin_code_digest("qemu")
    assert first != template_module.plugin_code_digest("cloud-hypervisor")


def test_a_missing_state_file_is_damage(cfg: config.Config) -> None:
    t = template(cfg)
    made(t)
    (t.path / "state").unlink()
    assert "state file" in (t.problem() or "")


def test_a_template_whose_ram_holder_is_gone_is_damaged(cfg: config.Config) -> None:
    t = template(cfg)
    made(t)
    record = ram_holder.Record.load(t.path / "ram.json")
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while record.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"(pid {record.pid}) is gone" in (t.problem() or "")
    assert not t.status().ready


def test_a_template_whose_ram_is_not_sealed_is_damaged(cfg: config.Config) -> None:
    t = template(cfg)
    holder = made(t, seal=False)
    try:
        assert t.problem() == "the template's RAM is not sealed against writes"
    finally:
        holder.close()


def test_a_template_without_a_ram_record_is_damaged(cfg: config.Config) -> None:
    t = template(cfg)
    made(t)
    (t.path / "ram.json").unlink()
    assert t.problem() == "the template's RAM has no holder record"


def test_clones_map_the_holders_memfd_and_load_the_state_file(cfg: config.Config) -> None:
    t = template(cfg)
    holder = made(t)
    assert t.files.role != TEMPLATE
    assert t.files.memory == Path(f"/proc/{holder.record.pid}/fd/{holder.record.fd}")
    assert os.readlink(t.files.memory).startswith("/memfd:husk-template-ram ")
    assert t.files.state == t.path / "state"


def test_destroying_the_template_stops_its_ram_holder(cfg: config.Config) -> None:
    t = template(cfg)
    record = made(t).record
    assert t.destroy() == []
    assert not record.alive() and not t.path.exists()


def _with_template_path(cfg: config.Config, path: Path) -> config.Config:
    factory_section = dataclasses.replace(cfg.factory, template_path=path)
    return dataclasses.replace(cfg, factory=factory_section)


async def test_checking_a_template_keeps_the_mode_of_a_parent_husk_did_not_make(
    cfg: config.Config, tmp_path: Path
) -> None:
    run = tmp_path / "run"  # stands for /run, the default template_path's parent
    run.mkdir()
    run.chmod(0o755)
    t = template(_with_template_path(cfg, run / "husk-template"))
    made(t)
    try:
        await t.ensure()
        assert stat.S_IMODE(run.stat().st_mode) == 0o755
        assert (run / "husk-template.lock").exists()
    finally:
        assert t.destroy() == []  # its RAM holder too: no_holder_left knows only cfg's


async def test_a_directory_husk_makes_for_the_template_lock_is_private(
    cfg: config.Config, tmp_path: Path
) -> None:
    t = template(_with_template_path(cfg, tmp_path / "new" / "husk-template"))
    async with t._lock():
        pass
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
