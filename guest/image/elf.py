"""Just enough ELF64 (little-endian) reading for the image build.

Two questions are asked of binaries: which shared libraries does it need
(``DT_NEEDED``) and, for kernel modules, what is in the ``.modinfo`` section.
"""

from __future__ import annotations

import struct
from pathlib import Path

_ELF_MAGIC = b"\x7fELF"
_SHT_DYNAMIC = 6
_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5


class NotElfError(ValueError):
    """The file is not a 64-bit little-endian ELF object."""


def is_elf(data: bytes) -> bool:
    return data[:4] == _ELF_MAGIC


class ElfFile:
    """Section-level view of an ELF64 LE object held in memory."""

    def __init__(self, data: bytes, name: str = "<elf>") -> None:
        if not is_elf(data) or data[4] != 2 or data[5] != 1:
            raise NotElfError(f"{name}: not a 64-bit little-endian ELF file")
        self.data = data
        self.name = name
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        self._sections: list[tuple[int, int, int, int, int]] = []
        for i in range(shnum):
            off = shoff + i * shentsize
            sh_name, sh_type = struct.unpack_from("<II", data, off)
            sh_addr, sh_offset, sh_size = struct.unpack_from("<QQQ", data, off + 0x10)
            sh_link = struct.unpack_from("<I", data, off + 0x28)[0]
            self._sections.append((sh_name, sh_type, sh_offset, sh_size, sh_link))
            del sh_addr
        self._shstr = self._raw(shstrndx) if shnum else b""

    @classmethod
    def read(cls, path: Path) -> ElfFile:
        return cls(path.read_bytes(), str(path))

    def _raw(self, index: int) -> bytes:
        _, _, offset, size, _ = self._sections[index]
        return self.data[offset : offset + size]

    def section(self, name: str) -> bytes | None:
        wanted = name.encode()
        for i, (sh_name, *_rest) in enumerate(self._sections):
            end = self._shstr.find(b"\0", sh_name)
            if self._shstr[sh_name:end] == wanted:
                return self._raw(i)
        return None

    def needed(self) -> list[str]:
        """The ``DT_NEEDED`` entries (shared libraries), in order."""
        for _, sh_type, offset, size, link in self._sections:
            if sh_type != _SHT_DYNAMIC:
                continue
            strtab = self._raw(link)
            out: list[str] = []
            for pos in range(offset, offset + size, 16):
                tag, val = struct.unpack_from("<qQ", self.data, pos)
                if tag == _DT_NULL:
                    break
                if tag == _DT_NEEDED:
                    end = strtab.find(b"\0", val)
                    out.append(strtab[val:end].decode())
            return out
        return []


def modinfo(data: bytes, name: str = "<module>") -> dict[str, list[str]]:
    """The key=value pairs of a kernel module's ``.modinfo`` section."""
    raw = ElfFile(data, name).section(".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info
