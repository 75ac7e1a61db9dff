"""``manifest.json`` of a built image, the input digest, and finding a usable image."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KERNEL_NAME = "vmlinuz"  # bzImage, as Debian ships it; boots everywhere
VMLINUX_NAME = "vmlinux"  # uncompressed ELF with a PVH entry; boots ~2.5 s faster under TCG
INITRD_NAME = "initrd.img"  # the whole guest as an initramfs
ROOT_IMAGE_NAME = "root.img"  # the whole guest as a read-only ext4, mapped by virtio-pmem
LOADER_NAME = "root-initrd.img"  # the initramfs that mounts root.img
BUSYBOX_NAME = "busybox"  # static busybox from the guest, for a host-side throw-away rootfs
MANIFEST_NAME = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class Artefact:
    sha256: str
    size: int


@dataclass(frozen=True)
class ImageManifest:
    """What an image was built from and what it holds."""

    kernel_version: str
    compression: str
    inputs_digest: str
    built_at: str
    build_seconds: float
    packages: dict[str, str] = field(default_factory=dict)
    python_distributions: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    artefacts: dict[str, Artefact] = field(default_factory=dict)
    initrd_uncompressed_size: int = 0
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ImageManifest:
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("unknown manifest format")
        data["artefacts"] = {k: Artefact(**v) for k, v in data.get("artefacts", {}).items()}
        return cls(**data)


def image_paths(output_dir: Path) -> tuple[Path, Path]:
    """(kernel, initrd) paths of the image in ``output_dir``.

    The kernel is ``vmlinux`` (PVH ELF: give it to QEMU's ``-kernel``, Cloud
    Hypervisor or Firecracker) when the image has one, else the ``vmlinuz`` bzImage.
    """
    vmlinux = output_dir / VMLINUX_NAME
    kernel = vmlinux if vmlinux.exists() else output_dir / KERNEL_NAME
    return kernel, output_dir / INITRD_NAME


def find_image(output_dir: Path) -> ImageManifest | None:
    """The manifest of a complete image in ``output_dir``, or None.

    Complete means: the manifest parses and each artefact it names exists with the
    recorded size (hashes are not recomputed here; this is for ``husk check``).
    """
    try:
        manifest = ImageManifest.from_json((output_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    for name in {KERNEL_NAME, INITRD_NAME, *manifest.artefacts}:
        art = manifest.artefacts.get(name)
        try:
            if art is None or (output_dir / name).stat().st_size != art.size:
                return None
        except OSError:
            return None
    return manifest


def inputs_digest(
    packages: Mapping[str, str],
    python_distributions: Mapping[str, str],
    files: Iterable[tuple[str, bytes]],
    extra: Mapping[str, str] | None = None,
) -> str:
    """sha256 over package versions, Python distribution versions and (name, content) files."""
    h = hashlib.sha256()
    doc = {
        "packages": dict(sorted(packages.items())),
        "python": dict(sorted(python_distributions.items())),
        "extra": dict(sorted((extra or {}).items())),
        "format": FORMAT,
    }
    h.update(json.dumps(doc, sort_keys=True).encode())
    for name, data in sorted(files):
        h.update(b"\0file\0" + name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def is_current(output_dir: Path, digest: str) -> ImageManifest | None:
    """The existing image's manifest if it was built from exactly these inputs."""
    manifest = find_image(output_dir)
    if manifest is not None and manifest.inputs_digest == digest:
        return manifest
    return None
