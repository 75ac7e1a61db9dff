"""The PVH vmlinux the image build writes: its segments' zero tails are not file data."""

from __future__ import annotations

import struct

from guest.image.kernel import trim_zero_tails

_PHOFF = 64
_PHENTSIZE = 56


def make_elf(segments: list[tuple[int, bytes, int]]) -> bytes:
    """An ELF64 LE header and program headers for (type, file data, memory size) segments,
    the data after them."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, _PHOFF)
    struct.pack_into("<HH", header, 0x36, _PHENTSIZE, len(segments))
    table = bytearray()
    data = bytearray()
    offset = _PHOFF + _PHENTSIZE * len(segments)
    for p_type, content, memsz in segments:
        table += struct.pack("<IIQQQQQQ", p_type, 5, offset + len(data), 0, 0,
                             len(content), memsz, 0x1000)  # fmt: skip
        data += content
    return bytes(header + table + data)


def segment_sizes(elf: bytes) -> list[tuple[int, int]]:
    """(file size, memory size) of each program header."""
    (count,) = struct.unpack_from("<H", elf, 0x38)
    return [struct.unpack_from("<QQ", elf, _PHOFF + i * _PHENTSIZE + 0x20) for i in range(count)]


def test_a_segments_trailing_zeros_become_memory_the_loader_zero_fills() -> None:
    elf = make_elf([(1, b"text" + b"\0" * 4096, 8192)])
    assert segment_sizes(trim_zero_tails(elf)) == [(4, 8192)]


def test_a_segment_of_zeros_only_has_no_file_data() -> None:
    elf = make_elf([(1, b"code", 4), (1, b"\0" * 100, 200)])
    assert segment_sizes(trim_zero_tails(elf)) == [(4, 4), (0, 200)]


def test_zeros_inside_a_segment_and_other_segment_kinds_stay() -> None:
    elf = make_elf([(1, b"a\0\0b\0", 5), (4, b"note\0\0", 6)])
    trimmed = trim_zero_tails(elf)
    assert segment_sizes(trimmed) == [(4, 5), (6, 6)]
    assert trimmed[_PHOFF + 2 * _PHENTSIZE :] == elf[_PHOFF + 2 * _PHENTSIZE :]
