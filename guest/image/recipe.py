"""What goes into the guest image: Debian packages, kernel modules, Python pieces.

Everything a reader may want to tune lives here; the other modules only carry it out.
A change to this file (or any file of the recipe) changes the input digest and so
forces a rebuild.
"""

from __future__ import annotations

# The meta package is resolved to the concrete linux-image-<abi>-amd64 package.
KERNEL_META_PACKAGE = "linux-image-amd64"

# Fetched with `apt-get download` and unpacked with `dpkg-deb -x`. Libraries are
# listed by hand (not via apt's dependency closure) because the guest needs only a
# few of what the Debian packages depend on; `rootfs.check_libraries` proves every
# ELF file in the initrd finds the libraries it needs.
PACKAGES: tuple[str, ...] = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "runc",
    # crun: the OCI runtime the agent prefers. A C binary starts in a fraction of
    # runc's time under TCG, where runc's two Go runtime starts dominate a create.
    "crun",
    "libcap2",
    "libsystemd0",
    "libyajl2",
    "libgcrypt20",
    "libgpg-error0",
    "liblz4-1",
    "liblzma5",
    "libzstd1",
    "libc6",
    "libseccomp2",
    "zlib1g",
    "libexpat1",
    "libffi8",  # _ctypes (imported by trio via ctypes.util on some paths)
    "libssl3",  # _ssl: trio imports ssl at import time
    "libstdc++6",  # protobuf's upb extension (_message.abi3.so)
    "libgcc-s1",
)

# Modules the guest's /init loads at boot, in this order (each after its dependencies):
# the drivers of the devices a sandbox VM has at boot or gets hot-plugged (nothing
# loads a driver for a hot-plugged device later: the guest runs no udev).
KERNEL_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_console",  # virtio-serial: the agent channel on hosts without vsock
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_mem",  # memory hot-plug: the sandbox grows (and shrinks) with its containers
    "virtio_balloon",  # free page reporting: pages the guest frees go back to the host
    # fw_cfg in sysfs: the agent reads the sandbox's channel secret from QEMU's
    # opt/io.husk/agent-secret (found through ACPI's QEMU0002 device on q35)
    "qemu_fw_cfg",
    "vsock",
    "vmw_vsock_virtio_transport",
)
# Modules in the initrd that nothing loads at boot: the guest kernel asks for each
# the first time it is used (a mount of 9p, overlay or ext4 requests ``fs-<type>``,
# 9p's transport ``9p-virtio``, ext4 its ``crypto-crc32c``) and busybox modprobe
# finds it through modules.alias. Measured under TCG: ~0.5 s of the boot's 1.3 s of
# module loading, paid only by the sandboxes that use them.
ON_DEMAND_MODULES: tuple[str, ...] = (
    "9p",
    "9pnet_virtio",
    "fuse",
    "virtiofs",
    "overlay",
    "crc32c_generic",  # soft pre-dependency of ext4/jbd2 (alias crypto-crc32c)
    "ext4",
    # a privileged container's `brctl addbr` / `ip link add type bridge`: the
    # kernel asks for "bridge" (and modprobe brings stp and llc); critest's
    # Privileged and capability specs make one
    "bridge",
)

# What root-initrd.img's loader loads to mount root.img (with their dependencies):
# the PCI transport, the virtio-pmem device and its nvdimm region's block driver,
# erofs (the image: ~10x smaller than ext4.ko and its jbd2, mbcache, crc16 and
# crc32c, which the loader would load under TCG for nothing) and overlay (a tmpfs
# for the guest's writes on top of it).
ROOT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_pmem", "nd_pmem", "erofs", "overlay")

# softdep targets named by alias rather than module name.
MODULE_ALIASES: dict[str, str] = {"crypto_crc32c": "crc32c_generic", "crc32c": "crc32c_generic"}

# Python: Debian's python3.11 with its stdlib minus what a headless agent never imports.
PYTHON_VERSION = "3.11"
STDLIB_EXCLUDE_DIRS: frozenset[str] = frozenset(
    {
        "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip",
        "lib2to3", "pydoc_data", "distutils", "unittest", "sqlite3", "dbm", "curses",
        "venv", "config-3.11-x86_64-linux-gnu", "__pycache__", "msilib",
        # Not used by a trio agent: keeps the initrd (and its unpacking at boot) small.
        "asyncio", "email", "http", "xmlrpc", "wsgiref", "html", "xml", "multiprocessing",
    }
)  # fmt: skip
STDLIB_EXCLUDE_FILES: frozenset[str] = frozenset(
    {"turtle.py", "pydoc.py", "doctest.py", "tabnanny.py", "this.py", "antigravity.py"}
)
# Extension modules left out: tests, and ones whose libraries the guest lacks on purpose.
DYNLOAD_EXCLUDE_PREFIXES: tuple[str, ...] = (
    "_test", "_ctypes_test", "xxlimited", "_xxtestfuzz", "_xxsubinterpreters", "_curses",
    "_dbm", "_sqlite3", "readline", "nis", "ossaudiodev", "audioop", "_crypt",
    "_codecs_", "_lsprof", "_bz2", "_lzma", "_uuid",
)  # fmt: skip

# Shared libraries kept although no ELF file names them (they are dlopen()ed).
# ld.so itself is kept because every program names it as its interpreter.
KEEP_LIBRARIES: tuple[str, ...] = ("ld-linux-x86-64.so.2",)

# Pure-Python (or abi3) distributions copied from the host's installed versions.
PYTHON_DISTRIBUTIONS: tuple[str, ...] = (
    "trio",
    "sniffio",
    "attrs",
    "outcome",
    "sortedcontainers",
    "idna",
    "protobuf",
)
# Top-level directories of a distribution that are never needed in the guest.
DIST_EXCLUDE_DIRS: frozenset[str] = frozenset({"_tests", "tests", "testing", "__pycache__"})

# husk's own code in the guest: the agent's package and every first-party package
# its import graph reaches (``imports.package_closure``), each carried whole. The
# agent may reach only the packages listed as carried; a package listed as never
# carried (the host program, the plugins, this builder) is a recipe error.
AGENT_PACKAGE = "guest.agent"
CARRIED_PACKAGES: tuple[str, ...] = ("guest.agent", "agent_proto", "ttrpc", "common")
NEVER_CARRIED: tuple[str, ...] = ("shim", "plugins", "guest.image", "bench", "tests")

# Where things live inside the initrd.
GUEST_HUSK_DIR = "usr/lib/husk"
GUEST_DIST_DIR = "usr/lib/python3/dist-packages"
GUEST_MODULE_LIST = "etc/husk/modules"
LOADER_MODULE_LIST = "etc/husk/root-modules"

# initrd compression: "none" boots fastest under TCG (measured: 0.4 s faster than
# zstd -19 for a 46 MiB initrd), "zstd" is 3.5x smaller on disk and in guest memory.
INITRD_COMPRESSION = "none"

# Free space the build needs next to the output (the kernel package unpacks to ~450 MiB).
MIN_FREE_BYTES = 800 * 1024 * 1024
