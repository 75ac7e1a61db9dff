"""manifest.json, the inputs digest and the "skip an unchanged rebuild" decision."""

from __future__ import annotations

from pathlib import Path

from guest.image.manifest import (
    INITRD_NAME,
    KERNEL_NAME,
    MANIFEST_NAME,
    VMLINUX_NAME,
    Artefact,
    ImageManifest,
    find_image,
    image_paths,
    inputs_digest,
    is_current,
)

PKGS = {"linux-image-6.1.0-56-amd64": "6.1.192-2", "busybox-static": "1:1.35.0-4"}
DISTS = {"trio": "0.35.0"}
FILES = [("guest/init/init.sh", b"#!/bin/sh\n"), ("guest/image/recipe.py", b"X = 1\n")]


def write_image(d: Path, digest: str, *, vmlinux: bool = False) -> ImageManifest:
    d.mkdir(parents=True, exist_ok=True)
    arts = {KERNEL_NAME: b"kernel", INITRD_NAME: b"initrd!"}
    if vmlinux:
        arts[VMLINUX_NAME] = b"\x7fELF..."
    for name, data in arts.items():
        (d / name).write_bytes(data)
    manifest = ImageManifest(
        kernel_version="6.1.0-56-amd64",
        compression="none",
        inputs_digest=digest,
        built_at="2025-01-01T00:00:00+00:00",
        build_seconds=1.0,
        packages=dict(PKGS),
        artefacts={n: Artefact("0" * 64, len(v)) for n, v in arts.items()},
    )
    (d / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def test_digest_is_stable_and_order_independent() -> None:
    a = inputs_digest(PKGS, DISTS, FILES, {"python": "3.11.7"})
    b = inputs_digest(dict(reversed(list(PKGS.items()))), DISTS, list(reversed(FILES)),
                      {"python": "3.11.7"})  # fmt: skip
    assert a == b


def test_digest_changes_with_each_input() -> None:
    base = inputs_digest(PKGS, DISTS, FILES)
    assert inputs_digest({**PKGS, "busybox-static": "1:1.36"}, DISTS, FILES) != base
    assert inputs_digest(PKGS, {"trio": "0.36.0"}, FILES) != base
    assert inputs_digest(PKGS, DISTS, [*FILES[:1], ("guest/image/recipe.py", b"X = 2\n")]) != base
    assert inputs_digest(PKGS, DISTS, [*FILES, ("shim/ttrpc/new.py", b"")]) != base
    assert inputs_digest(PKGS, DISTS, FILES, {"compression": "zstd"}) != base


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = write_image(tmp_path, "d1", vmlinux=True)
    assert ImageManifest.from_json(m.to_json()) == m
    assert find_image(tmp_path) == m


def test_is_current_only_for_same_digest(tmp_path: Path) -> None:
    write_image(tmp_path, "d1")
    assert is_current(tmp_path, "d1") is not None
    assert is_current(tmp_path, "d2") is None


def test_incomplete_image_is_not_found(tmp_path: Path) -> None:
    assert find_image(tmp_path) is None
    write_image(tmp_path, "d1")
    (tmp_path / INITRD_NAME).write_bytes(b"truncated")  # size differs from the manifest
    assert find_image(tmp_path) is None
    assert is_current(tmp_path, "d1") is None
    write_image(tmp_path, "d1")
    (tmp_path / KERNEL_NAME).unlink()
    assert find_image(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert find_image(tmp_path) is None


def test_image_paths_prefer_pvh_vmlinux(tmp_path: Path) -> None:
    assert image_paths(tmp_path) == (tmp_path / KERNEL_NAME, tmp_path / INITRD_NAME)
    write_image(tmp_path, "d1", vmlinux=True)
    assert image_paths(tmp_path) == (tmp_path / VMLINUX_NAME, tmp_path / INITRD_NAME)
