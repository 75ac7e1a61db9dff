"""Turn the tree into a compressed initramfs: cpio newc, then zstd (or gzip)."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

from guest.image import cpio
from guest.image.packages import Runner
from guest.image.rootfs import Tree

ZSTD_LEVEL = 19


def kernel_supports(config_text: str, option: str) -> bool:
    return f"\n{option}=y" in "\n" + config_text


def choose_compression(config_text: str) -> str:
    """zstd decompresses several times faster than gzip at boot; use it when possible."""
    if kernel_supports(config_text, "CONFIG_RD_ZSTD") and shutil.which("zstd"):
        return "zstd"
    if kernel_supports(config_text, "CONFIG_RD_GZIP"):
        return "gzip"
    return "none"


def archive(tree: Tree) -> bytes:
    buf = io.BytesIO()
    cpio.write(buf, tree.entries())
    return buf.getvalue()


def write_initrd(run: Runner, tree: Tree, dest: Path, compression: str) -> int:
    """Write the compressed archive to ``dest``; returns the uncompressed size."""
    raw = archive(tree)
    if compression == "zstd":
        plain = dest.with_name(dest.name + ".cpio")
        plain.write_bytes(raw)
        try:
            run(["zstd", "-q", f"-{ZSTD_LEVEL}", "-T0", "-f", "-o", str(dest), str(plain)],
                dest.parent)  # fmt: skip
        finally:
            plain.unlink(missing_ok=True)
    elif compression == "gzip":
        with dest.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(raw)
    else:
        dest.write_bytes(raw)
    return len(raw)
