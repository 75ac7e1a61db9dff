"""build_image's failure paths and skip logic, with fake apt tools on PATH.

The real build code runs; only apt-get/apt-cache are replaced by small shell
scripts (no network, no root, fast).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
from pathlib import Path

import pytest

from common.errors import FailedPreconditionError
from guest.image import (
    AptError,
    DiskSpaceError,
    ImageBuildError,
    ToolMissingError,
    build_image,
    recipe,
)
from guest.image.build import artefact_records, make_plan, write_busybox
from guest.image.errors import RecipeError
from guest.image.manifest import (
    BUSYBOX_NAME,
    INITRD_NAME,
    KERNEL_NAME,
    MANIFEST_NAME,
    Artefact,
    ImageManifest,
    find_image,
)
from guest.image.packages import parse_print_uris, subprocess_runner

FAKE_APT_GET = r"""#!/bin/sh
# fake apt-get: FAKE_APT_MODE=ok|network; real downloads always fail (and are logged)
if [ "$FAKE_APT_MODE" = network ]; then
    echo "Err:1 http://archive.invalid/debian bookworm/main amd64 busybox-static" >&2
    echo "E: Failed to fetch http://archive.invalid/debian/pool/x.deb  Temporary failure \
resolving 'archive.invalid'" >&2
    exit 100
fi
uris=0; pkgs=""
for a in "$@"; do
    case "$a" in
        --print-uris) uris=1 ;;
        -*|download|APT::*) ;;
        *) pkgs="$pkgs $a" ;;
    esac
done
if [ $uris = 1 ]; then
    for p in $pkgs; do
        echo "'http://archive.invalid/debian/pool/main/$p.deb'" \
            "${p}_1.0-1_amd64.deb 1234 SHA256:00ff"
    done
    exit 0
fi
echo "download$pkgs" >> "$FAKE_APT_LOG"
echo "E: Failed to fetch http://archive.invalid/debian/pool/main/x.deb  404  Not Found" >&2
exit 100
"""

FAKE_APT_CACHE = r"""#!/bin/sh
[ "$FAKE_APT_MODE" = network ] && { echo "E: cache broken" >&2; exit 100; }
echo "Package: linux-image-amd64"
echo "Version: 6.1.999-1"
echo "Depends: linux-image-6.1.0-99-amd64 (= 6.1.999-1)"
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin dir with fake apt-get/apt-cache first on PATH; returns the download log path."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    _script(bindir / "apt-get", FAKE_APT_GET)
    _script(bindir / "apt-cache", FAKE_APT_CACHE)
    log = tmp_path / "apt.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_APT_MODE", "ok")
    monkeypatch.setenv("FAKE_APT_LOG", str(log))
    return log


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text
    return text


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_no_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "images"
    with pytest.raises(ToolMissingError) as info:
        build_image(out, progress=lambda _: None)
    assert isinstance(info.value, FailedPreconditionError)
    msg = _one_line(info.value)
    assert "apt-get" in msg and "install the Debian package 'apt'" in msg
    assert not out.exists()


def test_apt_network_failure_removes_partial_output(
    fake_apt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_APT_MODE", "network")
    out = tmp_path / "images"
    with pytest.raises(AptError) as info:
        build_image(out, progress=lambda _: None)
    assert isinstance(info.value, FailedPreconditionError)
    assert "cache broken" in _one_line(info.value)
    assert not out.exists()


def test_apt_download_failure_is_one_line_and_cleans_up(fake_apt: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    out.mkdir()
    (out / "unrelated").write_text("kept")
    lines: list[str] = []
    with pytest.raises(AptError) as info:
        build_image(out, progress=lines.append)
    msg = _one_line(info.value)
    assert "apt-get download" in msg and "404" in msg
    assert _leftovers(out) == ["unrelated"]  # no .build-* temp dir, no half image
    assert "linux-image-6.1.0-99-amd64=1.0-1" in fake_apt.read_text()
    assert lines[0].startswith("[1/10] check host")
    packages = len(recipe.PACKAGES) + 1  # and the kernel the meta package resolves to
    assert lines[1].startswith(
        f"[2/10] resolve packages: {packages} packages, kernel linux-image-6.1.0-99"
    )


def test_not_enough_disk_space(fake_apt: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    with pytest.raises(DiskSpaceError) as info:
        build_image(out, progress=lambda _: None, min_free_bytes=1 << 62)
    assert "not enough disk space" in _one_line(info.value)
    assert not out.exists()
    assert not fake_apt.exists()


def test_unknown_compression_is_rejected(fake_apt: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown initrd compression 'lz5'"):
        build_image(tmp_path / "images", progress=lambda _: None, compression="lz5")


def _write_current_image(out: Path, digest: str) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    arts = {KERNEL_NAME: b"old kernel", INITRD_NAME: b"old initrd"}
    for name, data in arts.items():
        (out / name).write_bytes(data)
    manifest = ImageManifest(
        kernel_version="6.1.0-99-amd64",
        compression="none",
        inputs_digest=digest,
        built_at="2025-01-01T00:00:00+00:00",
        build_seconds=1.0,
        artefacts={n: Artefact("0" * 64, len(v)) for n, v in arts.items()},
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return {**arts, MANIFEST_NAME: (out / MANIFEST_NAME).read_bytes()}


def test_unchanged_inputs_skip_the_build(fake_apt: Path, tmp_path: Path) -> None:
    work = tmp_path / "plan"
    work.mkdir()
    plan = make_plan(subprocess_runner(), work, "none")
    out = tmp_path / "images"
    before = _write_current_image(out, plan.digest)
    lines: list[str] = []
    manifest = build_image(out, progress=lines.append, compression="none")
    assert manifest.inputs_digest == plan.digest
    assert any("up to date" in ln and "skipping" in ln for ln in lines)
    assert not fake_apt.exists()  # nothing was downloaded
    assert {n: (out / n).read_bytes() for n in before} == before
    assert _leftovers(out) == sorted(before)


def test_changed_inputs_or_force_rebuild_and_failure_keeps_old_image(
    fake_apt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "images"
    before = _write_current_image(out, "digest-of-other-inputs")
    with pytest.raises(AptError):
        build_image(out, progress=lambda _: None, compression="none")
    assert fake_apt.exists()  # it tried to fetch
    assert {n: (out / n).read_bytes() for n in before} == before
    assert _leftovers(out) == sorted(before)

    work = tmp_path / "plan"
    work.mkdir()
    _write_current_image(out, make_plan(subprocess_runner(), work, "none").digest)
    fake_apt.unlink()
    with pytest.raises(AptError):
        build_image(out, force=True, progress=lambda _: None, compression="none")
    assert fake_apt.exists()


def test_parse_print_uris() -> None:
    text = (
        "'http://archive.invalid/debian/pool/main/b/busybox/busybox-static_1%3a1.35.0-4%2bb1"
        "_amd64.deb' busybox-static_1%3a1.35.0-4+b1_amd64.deb 928188 SHA256:AbC\n"
        "W: something\n"
    )
    (deb,) = parse_print_uris(text)
    assert (deb.name, deb.version, deb.size, deb.sha256) == (
        "busybox-static", "1:1.35.0-4+b1", 928188, "abc",
    )  # fmt: skip
    assert deb.filename == "busybox-static_1:1.35.0-4+b1_amd64.deb"


#: an ELF64 header without sections: no DT_NEEDED, so static to the build's reader
STATIC_ELF = (
    b"\x7fELF\x02\x01\x01" + bytes(9)
    + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0, 0, 0, 0, 64, 0, 0, 64, 0, 0)
)  # fmt: skip


def test_the_static_busybox_is_written_executable_and_listed(tmp_path: Path) -> None:
    staging = tmp_path / "root"
    (staging / "bin").mkdir(parents=True)
    (staging / "bin" / "busybox").write_bytes(STATIC_ELF)
    out = tmp_path / "out"
    out.mkdir()
    for name in (KERNEL_NAME, INITRD_NAME):
        (out / name).write_bytes(name.encode())
    write_busybox(staging, out / BUSYBOX_NAME)
    busybox = out / BUSYBOX_NAME
    assert busybox.read_bytes() == STATIC_ELF
    assert stat.S_IMODE(busybox.stat().st_mode) == 0o755
    manifest = ImageManifest(
        kernel_version="6.1.0-99-amd64",
        compression="none",
        inputs_digest="d",
        built_at="2025-01-01T00:00:00+00:00",
        build_seconds=1.0,
        artefacts=artefact_records(out, [KERNEL_NAME, INITRD_NAME, BUSYBOX_NAME]),
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    found = find_image(out)
    assert found is not None
    assert found.artefacts[BUSYBOX_NAME] == Artefact(
        hashlib.sha256(STATIC_ELF).hexdigest(), len(STATIC_ELF)
    )
    busybox.write_bytes(STATIC_ELF + b"x")  # a listed artefact that changed: no image
    assert find_image(out) is None


def test_a_busybox_that_needs_libraries_is_refused(tmp_path: Path) -> None:
    staging = tmp_path / "root"
    (staging / "bin").mkdir(parents=True)
    (staging / "bin" / "busybox").write_bytes(Path(sys.executable).resolve().read_bytes())
    with pytest.raises(RecipeError, match=r"busybox is not static \(it needs .*libc"):
        write_busybox(staging, tmp_path / BUSYBOX_NAME)
    assert not (tmp_path / BUSYBOX_NAME).exists()
