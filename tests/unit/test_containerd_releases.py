"""Which containerd runs, from ``containerd --version``, and the config version it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.containerd import releases


@pytest.mark.parametrize(
    ("line", "release", "config_version"),
    [
        # Debian 12, Debian 13 and sid's containerd, as each prints it
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1", "1.6", 2),
        ("containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1", "1.7", 2),
        ("containerd github.com/containerd/containerd/v2 2.1.9+unknown ", "2.1", 3),
        # upstream's release binaries
        ("containerd github.com/containerd/containerd/v2 v2.4.0 abcdef0", "2.4", 3),
    ],
)
def test_containerd_version_lines_name_the_release_and_its_config_version(
    line: str, release: str, config_version: int
) -> None:
    found = releases.from_version_output(line)
    assert str(found) == release and found.config_version == config_version


def test_containerd_2_reads_both_config_versions_and_1_x_only_2() -> None:
    assert releases.parse("2.0").reads(2) and releases.parse("2.0").reads(3)
    assert releases.parse("1.7").reads(2) and not releases.parse("1.7").reads(3)


def test_a_containerd_older_than_1_6_is_refused_in_one_line() -> None:
    with pytest.raises(releases.ContainerdVersionError, match=r"^containerd 1\.5 is not supported"):
        releases.parse("1.5.18")


@pytest.mark.parametrize("text", ["two", "2", ""])
def test_a_version_that_is_not_x_y_is_refused_naming_it(text: str) -> None:
    with pytest.raises(releases.ContainerdVersionError, match=r"is not X\.Y or X\.Y\.Z"):
        releases.parse(text)


def test_detect_asks_the_containerd_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "containerd"
    fake.write_text(
        "#!/bin/sh\necho 'containerd github.com/containerd/containerd/v2 2.1.9+unknown '\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert releases.detect() == releases.Release(2, 1)


def test_detect_without_containerd_says_how_to_name_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(releases.ContainerdVersionError, match=r"--containerd-version X\.Y"):
        releases.detect()
