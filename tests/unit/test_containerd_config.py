"""``husk containerd-config``: husk's CRI runtime handlers in containerd's config."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from shim import config
from shim.cli import containerd_config as ctd
from shim.cli import local_images
from shim.containerd import releases
from shim.host import HostFacts

CRI = 'plugins."io.containerd.grpc.v1.cri"'


def _runtimes(text: str) -> dict[str, dict[str, object]]:
    doc = tomllib.loads(text)
    runtimes: dict[str, dict[str, object]] = doc["plugins"][ctd.CRI]["containerd"]["runtimes"]
    return runtimes


def test_snippet_names_both_handlers_with_their_config_paths() -> None:
    text = ctd.snippet(Path("/etc/husk/configuration.toml"), Path("/etc/husk/t.toml"))
    runtimes = _runtimes(text)
    assert runtimes["husk"]["runtime_type"] == "io.containerd.husk.v2"
    assert runtimes["husk"]["options"] == {"ConfigPath": "/etc/husk/configuration.toml"}
    assert runtimes["husk-template"]["options"] == {"ConfigPath": "/etc/husk/t.toml"}
    assert runtimes["husk"]["pod_annotations"] == ["io.husk.*"]
    assert tomllib.loads(text)["plugins"][ctd.CRI]["sandbox_image"] == local_images.PAUSE_REFERENCE


def test_merging_into_no_config_makes_a_version_2_file() -> None:
    text, added = ctd.merged("", Path("/a.toml"), Path("/b.toml"))
    assert tomllib.loads(text)["version"] == 2
    assert set(_runtimes(text)) == {"husk", "husk-template"}
    assert len(added) == 3


def test_merging_twice_adds_nothing() -> None:
    once, _ = ctd.merged("", Path("/a.toml"), Path("/b.toml"))
    twice, added = ctd.merged(once, Path("/a.toml"), Path("/b.toml"))
    assert twice == once and added == []


def test_an_operators_sandbox_image_and_runtimes_are_kept() -> None:
    existing = (
        f"version = 2\n[{CRI}]\n  sandbox_image = 'registry.k8s.io/pause:3.6'\n"
        f"[{CRI}.containerd.runtimes.runc]\n  runtime_type = 'io.containerd.runc.v2'\n"
    )
    text, _ = ctd.merged(existing, Path("/a.toml"), Path("/b.toml"))
    doc = tomllib.loads(text)
    assert doc["plugins"][ctd.CRI]["sandbox_image"] == "registry.k8s.io/pause:3.6"
    assert set(_runtimes(text)) == {"runc", "husk", "husk-template"}


def test_a_version_1_config_is_refused_in_one_line() -> None:
    with pytest.raises(ctd.ContainerdConfigError, match=r"version 1.*version = 2"):
        ctd.merged("[plugins.cri]\n  x = 1\n", Path("/a.toml"), Path("/b.toml"))


def test_broken_containerd_config_is_refused_unchanged(tmp_path: Path) -> None:
    broken = tmp_path / "config.toml"
    broken.write_text("version = 2\n[plugins\n")
    cfg = config.load(config.packaged_default(), host=HostFacts.probe())
    with pytest.raises(ctd.ContainerdConfigError, match="not valid TOML"):
        ctd.install(cfg, broken, tmp_path / "t.toml")
    assert broken.read_text() == "version = 2\n[plugins\n"


def test_the_template_config_turns_templates_on_and_loads(tmp_path: Path) -> None:
    cfg = config.load(config.packaged_default(), host=HostFacts.probe())
    changes = ctd.install(cfg, tmp_path / "config.toml", tmp_path / "t.toml")
    assert len(changes) == 2
    twin = config.load(tmp_path / "t.toml", host=HostFacts.probe())
    assert twin.factory.enable_template and not cfg.factory.enable_template
    assert ctd.install(cfg, tmp_path / "config.toml", tmp_path / "t.toml") == []


V3_RUNTIME = "io.containerd.cri.v1.runtime"
V3_IMAGES = "io.containerd.cri.v1.images"
CONTAINERD_2 = releases.parse("2.1")


def _v3_runtimes(text: str) -> dict[str, dict[str, object]]:
    runtimes: dict[str, dict[str, object]] = tomllib.loads(text)["plugins"][V3_RUNTIME][
        "containerd"
    ]["runtimes"]
    return runtimes


def test_containerd_2_gets_config_version_3s_cri_plugins() -> None:
    text = ctd.snippet(Path("/etc/husk/configuration.toml"), Path("/t.toml"), CONTAINERD_2)
    assert "version = 3" in text and ctd.CRI not in text
    runtimes = _v3_runtimes(text)
    assert runtimes["husk"] == {
        "runtime_type": "io.containerd.husk.v2",
        "pod_annotations": ["io.husk.*"],
        "options": {"ConfigPath": "/etc/husk/configuration.toml"},
    }
    assert runtimes["husk-template"]["options"] == {"ConfigPath": "/t.toml"}
    plugins = tomllib.loads(text)["plugins"]
    assert plugins[V3_IMAGES]["pinned_images"] == {"sandbox": local_images.PAUSE_REFERENCE}
    assert plugins[V3_RUNTIME]["cni"] == {"bin_dirs": ["/opt/cni/bin", "/usr/lib/cni"]}


def test_containerd_2_gets_husk_vm_with_the_shim_as_sandboxer() -> None:
    text = ctd.snippet(Path("/etc/husk/configuration.toml"), Path("/t.toml"), CONTAINERD_2)
    assert "husk-vm" in text.splitlines()[0]
    assert _v3_runtimes(text)["husk-vm"] == {
        "runtime_type": "io.containerd.husk.v2",
        "sandboxer": "shim",
        "pod_annotations": ["io.husk.*"],
        "options": {"ConfigPath": "/etc/husk/configuration.toml"},
    }


@pytest.mark.parametrize("version", ["1.6", "1.7"])
def test_containerd_1_6_and_1_7_get_config_version_2(version: str) -> None:
    text = ctd.snippet(Path("/a.toml"), Path("/b.toml"), releases.parse(version))
    assert f"containerd {version}" in text and "version = 2" in text
    assert set(_runtimes(text)) == {"husk", "husk-template"}
    assert V3_RUNTIME not in text and "bin_dir" not in text  # 1.x's one bin_dir stays its own


def test_merging_into_no_config_for_containerd_2_makes_a_version_3_file() -> None:
    text, added = ctd.merged("", Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    assert tomllib.loads(text)["version"] == 3
    assert set(_v3_runtimes(text)) == {"husk", "husk-template", "husk-vm"}
    assert len(added) == 5  # pause image, CNI dirs, three handlers


def test_merging_a_version_3_file_twice_adds_nothing() -> None:
    once, _ = ctd.merged("", Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    twice, added = ctd.merged(once, Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    assert twice == once and added == []


def test_an_operators_version_3_settings_are_kept() -> None:
    # as `containerd config default` (2.x) writes it: single-quoted plugin names
    existing = (
        "version = 3\n"
        f"[plugins.'{V3_IMAGES}'.pinned_images]\n  sandbox = 'registry.k8s.io/pause:3.10'\n"
        f"[plugins.'{V3_RUNTIME}'.cni]\n  bin_dirs = ['/opt/cni/bin']\n"
        f"[plugins.'{V3_RUNTIME}'.containerd.runtimes.runc]\n"
        "  runtime_type = 'io.containerd.runc.v2'\n"
    )
    text, added = ctd.merged(existing, Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    assert text.startswith(existing)
    plugins = tomllib.loads(text)["plugins"]
    assert plugins[V3_IMAGES]["pinned_images"]["sandbox"] == "registry.k8s.io/pause:3.10"
    assert plugins[V3_RUNTIME]["cni"]["bin_dirs"] == ["/opt/cni/bin"]
    assert set(_v3_runtimes(text)) == {"runc", "husk", "husk-template", "husk-vm"}
    assert [a.split()[0] for a in added] == ["handler", "handler", "handler"]


def test_a_pinned_images_table_without_a_sandbox_is_refused_in_one_line() -> None:
    existing = f"version = 3\n[plugins.'{V3_IMAGES}'.pinned_images]\n  other = 'x'\n"
    with pytest.raises(ctd.ContainerdConfigError) as caught:
        ctd.merged(existing, Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    message = str(caught.value)
    assert "set sandbox = " in message and "pinned_images" in message and "\n" not in message


def test_a_version_3_file_is_refused_for_containerd_1_7() -> None:
    once, _ = ctd.merged("", Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    with pytest.raises(ctd.ContainerdConfigError, match=r"version 3 is containerd 2's.*1\.7"):
        ctd.merged(once, Path("/a.toml"), Path("/b.toml"), releases.parse("1.7"))


def test_a_version_2_file_stays_version_2_for_containerd_2_which_converts_it() -> None:
    existing = f"version = 2\n[{CRI}]\n  sandbox_image = 'registry.k8s.io/pause:3.6'\n"
    text, _ = ctd.merged(existing, Path("/a.toml"), Path("/b.toml"), CONTAINERD_2)
    assert V3_RUNTIME not in text
    assert set(_runtimes(text)) == {"husk", "husk-template"}


def test_install_for_containerd_2_writes_version_3(tmp_path: Path) -> None:
    cfg = config.load(config.packaged_default(), host=HostFacts.probe())
    target = tmp_path / "config.toml"
    ctd.install(cfg, target, tmp_path / "t.toml", CONTAINERD_2)
    assert tomllib.loads(target.read_text())["version"] == 3
    assert _v3_runtimes(target.read_text())["husk"]["options"] == {"ConfigPath": str(cfg.source)}


def _installed(tmp_path: Path, existing: Path) -> Path:
    cfg = config.load(config.packaged_default(), host=HostFacts.probe())
    assert ctd.install(cfg, existing, tmp_path / "t.toml")
    assert "husk-template" in existing.read_text()
    return existing


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_install_keeps_the_mode_of_containerds_config(tmp_path: Path, mode: int) -> None:
    existing = tmp_path / "config.toml"
    existing.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n')
    existing.chmod(mode)
    assert stat.S_IMODE(_installed(tmp_path, existing).stat().st_mode) == mode


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
def test_install_keeps_the_owner_of_containerds_config(tmp_path: Path) -> None:
    existing = tmp_path / "config.toml"
    existing.write_text("version = 2\n")
    os.chown(existing, 65534, 65533)
    st = _installed(tmp_path, existing).stat()
    assert (st.st_uid, st.st_gid) == (65534, 65533)


def test_a_new_containerd_config_is_0644_as_containerds_package_ships_it(tmp_path: Path) -> None:
    made = _installed(tmp_path, tmp_path / "new" / "config.toml")
    assert stat.S_IMODE(made.stat().st_mode) == 0o644
