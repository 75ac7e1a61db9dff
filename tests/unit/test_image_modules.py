"""Kernel module selection: dependency order from modules.dep and from .modinfo."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from guest.image.elf import ElfFile, modinfo
from guest.image.errors import RecipeError
from guest.image.modules import ModuleIndex, module_name, parse_modules_dep, parse_softdep_pre

SAMPLE_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/net/9p/9pnet.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
"""


def test_module_name_normalises_dashes_and_suffixes() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("kernel/fs/ext4/ext4.ko.zst") == "ext4"


def test_parse_modules_dep() -> None:
    dep = parse_modules_dep(SAMPLE_DEP)
    assert dep["kernel/fs/9p/9p.ko"] == [
        "kernel/net/9p/9pnet.ko",
        "kernel/fs/fscache/fscache.ko",
        "kernel/fs/netfs/netfs.ko",
    ]
    assert dep["kernel/net/9p/9pnet.ko"] == []


def test_resolve_puts_every_module_after_its_dependencies() -> None:
    index = ModuleIndex.from_modules_dep(SAMPLE_DEP)
    order = index.resolve(["9p", "9pnet_virtio", "virtio_pci", "virtio-rng"])
    names = [module_name(p) for p in order]
    assert len(names) == len(set(names))
    for path in order:
        for dep in parse_modules_dep(SAMPLE_DEP)[path]:
            assert names.index(module_name(dep)) < names.index(module_name(path))
    assert set(names) == {
        "9p", "9pnet", "fscache", "netfs", "9pnet_virtio", "virtio", "virtio_ring",
        "virtio_pci", "virtio_pci_modern_dev", "virtio_rng",
    }  # fmt: skip


def test_builtin_modules_are_skipped() -> None:
    index = ModuleIndex.from_modules_dep(SAMPLE_DEP, builtin=["kernel/fs/netfs/netfs.ko"])
    names = [module_name(p) for p in index.resolve(["9p"])]
    assert "netfs" not in names
    assert names[-1] == "9p"


def test_missing_module_is_a_recipe_error_naming_it() -> None:
    index = ModuleIndex.from_modules_dep(SAMPLE_DEP)
    with pytest.raises(RecipeError, match=r"'vmw_vsock_virtio_transport'.*recipe\.py"):
        index.resolve(["virtio_pci", "vmw_vsock_virtio_transport"])


def test_written_modules_dep_lists_transitive_dependencies() -> None:
    index = ModuleIndex.from_modules_dep(SAMPLE_DEP)
    selected = index.resolve(["9pnet_virtio"])
    written = parse_modules_dep(index.modules_dep(selected))
    assert set(written) == set(selected)
    assert set(written["kernel/net/9p/9pnet_virtio.ko"]) == {
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/net/9p/9pnet.ko",
    }


BRIDGE_DEP = """\
kernel/net/llc/llc.ko:
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko: kernel/net/llc/llc.ko kernel/net/802/stp.ko
"""


def test_written_modules_dep_lists_each_dependency_before_its_own_dependencies() -> None:
    # modprobe (kmod's and busybox's) loads a line's dependencies from the last
    # one back: bridge needs stp, which needs llc, so llc must come after stp or
    # stp loads first and fails on llc's symbols ("Unknown symbol llc_sap_open")
    index = ModuleIndex.from_modules_dep(BRIDGE_DEP)
    written = parse_modules_dep(index.modules_dep(index.resolve(["bridge"])))
    assert written["kernel/net/bridge/bridge.ko"] == [
        "kernel/net/802/stp.ko",
        "kernel/net/llc/llc.ko",
    ]


def test_softdep_pre_parsing() -> None:
    assert parse_softdep_pre(["pre: crc32c post: foo", "pre: a-b"]) == ["crc32c", "a_b"]


# --- .modinfo in real ELF files --------------------------------------------------------


def make_ko(fields: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable object with a .modinfo section, like a kernel module."""
    modinfo_data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    header_size = 64
    modinfo_off = header_size
    shstr_off = modinfo_off + len(modinfo_data)
    shoff = (shstr_off + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = modinfo_data + shstrtab
    pad = b"\0" * (shoff - header_size - len(body))

    def sh(name: int, typ: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)

    sections = (
        sh(0, 0, 0, 0)
        + sh(1, 1, modinfo_off, len(modinfo_data))
        + sh(10, 3, shstr_off, len(shstrtab))
    )
    return header + body + pad + sections


def test_modinfo_reads_depends_and_softdep() -> None:
    ko = make_ko({"license": "GPL", "depends": "jbd2,mbcache,crc16", "softdep": "pre: crc32c"})
    info = modinfo(ko)
    assert info["depends"] == ["jbd2,mbcache,crc16"]
    assert info["softdep"] == ["pre: crc32c"]
    assert ElfFile(ko).needed() == []


def test_scan_without_modules_dep_uses_modinfo(tmp_path: Path) -> None:
    moddir = tmp_path / "6.1.0-test-amd64"
    files = {
        "kernel/fs/ext4/ext4.ko": {"depends": "jbd2,crc16", "softdep": "pre: crypto-crc32c"},
        "kernel/fs/jbd2/jbd2.ko": {"depends": ""},
        "kernel/lib/crc16.ko": {"depends": ""},
        "kernel/crypto/crc32c_generic.ko": {"depends": ""},
        "kernel/fs/overlayfs/overlay.ko": {"depends": ""},
    }
    for rel, fields in files.items():
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(make_ko(fields))
    (moddir / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    index = ModuleIndex.scan(moddir)
    order = [
        module_name(p)
        for p in index.resolve(["overlay", "ext4"], {"crypto_crc32c": "crc32c_generic"})
    ]
    assert order[-1] == "ext4"
    assert set(order) == {"ext4", "jbd2", "crc16", "crc32c_generic"}
    assert order.index("crc32c_generic") < order.index("ext4")


def test_modules_alias_lets_modprobe_find_a_filesystem_the_kernel_asks_for(tmp_path: Path) -> None:
    moddir = tmp_path / "6.1.0-test-amd64"
    files = {
        "kernel/fs/overlayfs/overlay.ko": {"alias": "fs-overlay"},
        "kernel/net/9p/9pnet_virtio.ko": {"alias": "9p-virtio"},
    }
    for rel, fields in files.items():
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(make_ko(fields))
    index = ModuleIndex.scan(moddir)
    selected = index.resolve(["overlay", "9pnet_virtio"])
    assert index.modules_alias(selected).splitlines() == [
        "alias fs-overlay overlay",
        "alias 9p-virtio 9pnet_virtio",
    ]
