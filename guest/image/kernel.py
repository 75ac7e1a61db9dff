"""The guest kernel: bzImage as shipped, plus the uncompressed ELF ``vmlinux`` for PVH boot.

QEMU (``-kernel vmlinux``), Cloud Hypervisor and Firecracker can start an ELF kernel
that carries a Xen PVH entry note directly, skipping the firmware and the in-guest
decompression of the bzImage. Under TCG that saves ~2.5 s per boot, so the build
extracts ``vmlinux`` once from the bzImage's payload.
"""

from __future__ import annotations

import gzip
import lzma
import struct

from guest.image.elf import ElfFile, NotElfError

_XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_LOAD = 1


class KernelFormatError(ValueError):
    """The file is not a bzImage whose payload this build can decompress."""


def bzimage_payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08 payload fields)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise KernelFormatError("not a bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise KernelFormatError(f"boot protocol {version:#x} has no payload fields")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start : start + length]


def decompress(payload: bytes) -> bytes:
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor().decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return gzip.decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    raise KernelFormatError(f"unsupported kernel compression (magic {payload[:4].hex()})")


def has_pvh_entry(elf: bytes) -> bool:
    """Whether the ELF kernel has the Xen PVH entry note QEMU's -kernel needs for ELF boot."""
    try:
        notes = ElfFile(elf, "vmlinux").section(".notes") or b""
    except NotElfError:
        return False
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def trim_zero_tails(elf: bytes) -> bytes:
    """``elf`` with each loadable segment's file size cut before its trailing zeros.

    x86's vmlinux carries ``.bss``, ``.brk`` and ``.init.scratch`` (~24 MiB of
    zeros) as file data of its last segment. QEMU maps the whole file and keeps
    the pages it copied into the guest resident for as long as the VM runs (its
    ROM blob for a reset); a segment whose memory size exceeds its file size is
    zero-filled by every ELF loader instead, and those pages are never touched.
    """
    out = bytearray(elf)
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    view = memoryview(elf)
    for i in range(phnum):
        at = phoff + i * phentsize
        (p_type,) = struct.unpack_from("<I", elf, at)
        p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<QQQQ", elf, at + 8)
        if p_type != _PT_LOAD or not p_filesz:
            continue
        kept = len(bytes(view[p_offset : p_offset + p_filesz]).rstrip(b"\0"))
        struct.pack_into("<Q", out, at + 0x20, kept)
    return bytes(out)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The PVH-bootable ELF kernel inside ``bzimage`` (zero tails trimmed, see
    :func:`trim_zero_tails`), or None if it has none."""
    try:
        elf = decompress(bzimage_payload(bzimage))
    except (KernelFormatError, lzma.LZMAError, OSError, EOFError):
        return None
    return trim_zero_tails(elf) if has_pvh_entry(elf) else None
