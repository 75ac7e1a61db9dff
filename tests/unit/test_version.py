"""`husk --version` and `containerd-shim-husk-v2 -v`: the same line, with the guest kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from guest.image.manifest import MANIFEST_NAME, Artefact, ImageManifest

ROOT = Path(__file__).resolve().parents[2]


def fake_image(directory: Path, kernel_version: str) -> None:
    directory.mkdir()
    artefacts = {}
    for name in ("vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"x" * 10)
        artefacts[name] = Artefact(sha256="0" * 64, size=10)
    manifest = ImageManifest(
        kernel_version=kernel_version,
        compression="none",
        inputs_digest="d",
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=1.0,
        artefacts=artefacts,
    )
    (directory / MANIFEST_NAME).write_text(manifest.to_json())


def version_of(module: str, flag: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, flag],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={"HUSK_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def config_with_image_dir(tmp_path: Path, image_dir: Path) -> Path:
    config = tmp_path / "husk.toml"
    config.write_text(f'[runtime]\nimage_dir = "{image_dir}"\n')
    return config


def test_husk_and_the_shim_print_the_same_line_with_the_guest_kernel(tmp_path: Path) -> None:
    fake_image(tmp_path / "images", "6.1.0-99-amd64")
    config = config_with_image_dir(tmp_path, tmp_path / "images")
    husk = version_of("shim", "--version", config)
    shim = version_of("shim.containerd.main", "-v", config)
    assert husk.returncode == shim.returncode == 0, husk.stderr + shim.stderr
    assert husk.stdout == shim.stdout
    assert husk.stdout.count("\n") == 1
    assert "guest kernel 6.1.0-99-amd64" in husk.stdout


def test_without_an_image_the_line_says_none_is_built(tmp_path: Path) -> None:
    config = config_with_image_dir(tmp_path, tmp_path / "nothing")
    out = version_of("shim", "--version", config).stdout
    assert out.startswith("husk ") and "no guest image built" in out
