"""How the suite finds the containerd releases of its matrix (no network, no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import containerd_versions as versions
from tests.integration.containerd_versions import ContainerdBinaries, ProvisionError

ONE_LINE = """\
# a comment
deb [arch=amd64 signed-by=/k.gpg] http://archive.invalid/debian bookworm main
deb http://security.invalid/debian-security bookworm-security main
"""

DEB822 = """\
Types: deb
URIs: http://disabled.invalid/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://sources.invalid/debian
Suites: bookworm

Types: deb
# the archive, behind a snapshot comment
URIs: http://archive.invalid/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_the_archive_is_the_one_line_source_of_the_hosts_suite(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(ONE_LINE)
    assert versions.host_archive([sources], "bookworm") == "http://archive.invalid/debian"


def test_the_archive_is_the_enabled_deb822_source_of_the_hosts_suite(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    assert versions.host_archive([sources], "bookworm") == "http://archive.invalid/debian"


def test_no_source_of_the_hosts_suite_is_one_line_naming_it(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text("deb http://security.invalid/debian-security bookworm-security main\n")
    with pytest.raises(ProvisionError, match="'bookworm'") as failure:
        versions.host_archive([sources, tmp_path / "missing.sources"], "bookworm")
    assert "\n" not in str(failure.value)


def test_apt_uses_only_its_own_sources_lists_and_archives(tmp_path: Path) -> None:
    options = versions.apt_options(tmp_path)
    pairs = dict(o.split("=", 1) for o in options if o != "-o")
    assert pairs["Dir::Etc::SourceList"] == str(tmp_path / "sources.list")
    assert pairs["Dir::Etc::SourceParts"] == pairs["Dir::Etc::PreferencesParts"] == "/dev/null"
    assert pairs["Dir::State::Lists"] == str(tmp_path / "lists")
    assert pairs["Dir::Cache"] == str(tmp_path / "cache")


def test_the_newest_release_of_a_line_leaves_pre_releases_out() -> None:
    listed = ["v2.3.9", "v2.4.0", "v2.4.10", "v2.4.2", "v2.4.11-rc.1", "v2.5.0"]
    assert versions.newest_release(listed, "2.4") == "v2.4.10"


def test_a_line_the_proxy_does_not_list_is_refused() -> None:
    with pytest.raises(ProvisionError, match=r"no v2\.9\.x"):
        versions.newest_release(["v2.4.0"], "2.9")


def test_config_version_follows_the_major_release() -> None:
    assert ContainerdBinaries("1.7", "1.7.24~ds1", Path("/x")).config_version == 2
    assert ContainerdBinaries("2.4", "2.4.2+unknown", Path("/x")).config_version == 3


def test_binaries_of_another_release_are_refused(tmp_path: Path) -> None:
    for name in versions.BINARIES:
        (tmp_path / name).touch()
    found = ContainerdBinaries("1.7", "1.6.20~ds1", tmp_path)
    with pytest.raises(ProvisionError, match=r"is version 1\.6\.20"):
        versions._check(found)


def test_a_release_the_suite_does_not_know_is_refused() -> None:
    with pytest.raises(ProvisionError, match=r"1\.6, 1\.7, 2\.4"):
        versions.provide("3.0")


def test_the_cache_dir_can_be_moved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(versions.CACHE_ENV, str(tmp_path))
    assert versions.cache_root() == tmp_path
    monkeypatch.delenv(versions.CACHE_ENV)
    assert versions.cache_root() == Path("/var/cache/husk-tests/containerd")
