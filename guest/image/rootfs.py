"""The initrd's file tree, assembled in memory from unpacked packages and the host.

``Tree`` maps guest paths to cpio entries; the ``add_*`` functions each put one
part of the guest in it (busybox, libraries, Python, kernel modules, husk code).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import marshal
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from struct import error as struct_error

from guest.image import imports, recipe
from guest.image.cpio import Entry
from guest.image.elf import ElfFile, NotElfError, is_elf
from guest.image.errors import RecipeError

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
CAN_COMPILE = sys.version_info[:2] == tuple(int(x) for x in recipe.PYTHON_VERSION.split("."))
PYC_TAG = f"cpython-{recipe.PYTHON_VERSION.replace('.', '')}"


class Tree:
    """Guest path -> entry; parent directories are created on demand."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str) -> Entry | None:
        return self._entries.get(path.strip("/"))

    def paths(self) -> list[str]:
        return list(self._entries)

    def add(self, entry: Entry) -> None:
        name = entry.name.strip("/")
        parent = PurePosixPath(name).parent
        if str(parent) != ".":
            self.mkdir(str(parent))
        self._entries[name] = Entry(name, entry.mode, entry.data, entry.rdev)

    def mkdir(self, path: str, perm: int = 0o755) -> None:
        path = path.strip("/")
        if path in self._entries:
            return
        parent = PurePosixPath(path).parent
        if str(parent) != ".":
            self.mkdir(str(parent))
        self._entries[path] = Entry.directory(path, perm)

    def remove(self, path: str) -> None:
        self._entries.pop(path.strip("/"), None)

    def add_host_path(self, src: Path, dest: str) -> None:
        """Copy one file or symlink from the host (permissions kept, owner/mtime dropped)."""
        st = src.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.add(Entry.symlink(dest, os.readlink(src)))
        elif stat.S_ISREG(st.st_mode):
            self.add(Entry.file(dest, src.read_bytes(), stat.S_IMODE(st.st_mode)))
        elif stat.S_ISDIR(st.st_mode):
            self.mkdir(dest, stat.S_IMODE(st.st_mode))

    def entries(self) -> list[Entry]:
        """All entries, sorted by path (directories before their contents)."""
        return [self._entries[k] for k in sorted(self._entries)]

    def size(self) -> int:
        return sum(len(e.data) for e in self._entries.values())


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            yield base / name
        for name in dirnames:
            if (base / name).is_symlink():
                yield base / name


def add_base(tree: Tree, init_script: bytes, module_list: Iterable[str] = ()) -> None:
    """The skeleton: mount points, /dev/console (the kernel opens it for /init), /init."""
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "etc", "mnt", "var"):
        tree.mkdir(d, 0o1777 if d == "tmp" else 0o755)
    tree.add(Entry.chardev("dev/console", 5, 1))
    tree.add(Entry.chardev("dev/null", 1, 3, 0o666))
    tree.add(Entry.file("init", init_script, 0o755))
    tree.add(Entry.file("etc/hostname", b"husk\n"))
    tree.add(Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    tree.add(Entry.file("etc/group", b"root:x:0:\n"))
    tree.add(Entry.symlink("etc/mtab", "/proc/self/mounts"))
    tree.add(Entry.file("etc/hosts", b"127.0.0.1 localhost husk\n::1 localhost\n"))


def add_busybox(tree: Tree, staging: Path, applets: Iterable[str]) -> None:
    """busybox plus a symlink per applet (``bin/sh`` -> ``/bin/busybox``)."""
    tree.add_host_path(staging / "bin/busybox", "bin/busybox")
    for applet in applets:
        applet = applet.strip().strip("/")
        if applet and applet not in tree and applet != "bin/busybox":
            tree.add(Entry.symlink(applet, "/bin/busybox"))


def add_binaries(tree: Tree, staging: Path, paths: Iterable[str]) -> None:
    for path in paths:
        src = staging / path
        if not src.exists() and not src.is_symlink():
            raise RecipeError(f"'{path}' is missing from the unpacked packages")
        tree.add_host_path(src, path)


def add_libraries(tree: Tree, staging: Path) -> None:
    """Shared libraries (top level of the multiarch dirs; no gconv, engines, ...)."""
    for libdir in LIB_DIRS[:3]:
        base = staging / libdir
        if not base.is_dir():
            continue
        for src in sorted(base.iterdir()):
            if src.is_symlink() or src.is_file():
                tree.add_host_path(src, f"{libdir}/{src.name}")


def _pyc(code_source: bytes, filename: str) -> bytes | None:
    """A hash-based, unchecked .pyc (PEP 552) for ``code_source``, or None if it won't compile."""
    try:
        code = compile(code_source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    flags = (0b01).to_bytes(4, "little")  # hash-based, do not check the source
    return (
        importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(code_source)
        + (marshal.dumps(code))
    )


def add_python_file(tree: Tree, src: Path, dest: str, *, keep_source: bool) -> None:
    """A .py file: as a sourceless .pyc, or the source plus its __pycache__ entry."""
    data = src.read_bytes()
    pyc = _pyc(data, "/" + dest) if CAN_COMPILE else None
    if pyc is None:
        tree.add(Entry.file(dest, data))
        return
    if keep_source:
        tree.add(Entry.file(dest, data))
        p = PurePosixPath(dest)
        tree.add(Entry.file(str(p.parent / "__pycache__" / f"{p.stem}.{PYC_TAG}.pyc"), pyc))
    else:
        tree.add(Entry.file(dest + "c", pyc))


def add_stdlib(tree: Tree, staging: Path) -> None:
    """Debian's stdlib without test suites, GUI and packaging tools; .py -> .pyc."""
    rel = f"usr/lib/python{recipe.PYTHON_VERSION}"
    root = staging / rel
    if not root.is_dir():
        raise RecipeError(f"'{rel}' is missing from the unpacked python packages")
    for src in _walk(root):
        parts = src.relative_to(root).parts
        if any(p in recipe.STDLIB_EXCLUDE_DIRS for p in parts[:-1]):
            continue
        name = parts[-1]
        if len(parts) == 1 and name in recipe.STDLIB_EXCLUDE_FILES:
            continue
        if parts[0] == "lib-dynload" and name.startswith(recipe.DYNLOAD_EXCLUDE_PREFIXES):
            continue
        dest = f"{rel}/{'/'.join(parts)}"
        if name.endswith(".py") and not src.is_symlink():
            add_python_file(tree, src, dest, keep_source=False)
        elif not name.endswith((".pyc", ".exe")):
            tree.add_host_path(src, dest)


def add_distributions(tree: Tree, names: Iterable[str]) -> dict[str, str]:
    """Copy installed distributions (by their RECORD) into the guest's dist-packages."""
    versions: dict[str, str] = {}
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise RecipeError(
                f"Python package '{name}' is not installed on this host: pip install {name}"
            ) from None
        versions[name] = dist.version
        for f in dist.files or []:
            parts = f.parts
            if (
                parts[0].endswith((".dist-info", ".egg-info", ".data"))
                or parts[0] in ("..", "bin", "__pycache__")
                or any(p in recipe.DIST_EXCLUDE_DIRS for p in parts[1:-1])
                or f.name.endswith((".pyc", ".pyi"))
                or f.name == "py.typed"
            ):
                continue
            src = Path(str(f.locate()))
            dest = f"{recipe.GUEST_DIST_DIR}/{f.as_posix()}"
            if f.name.endswith(".py"):
                add_python_file(tree, src, dest, keep_source=False)
            else:
                tree.add_host_path(src, dest)
    return versions


def husk_source_files(repo_root: Path) -> list[tuple[Path, str]]:
    """(host file, path relative to the python root) of the husk packages the agent needs."""
    needed = imports.package_closure(
        repo_root, recipe.AGENT_PACKAGE, recipe.CARRIED_PACKAGES, recipe.NEVER_CARRIED
    )
    return imports.package_files(repo_root, needed)


def add_husk(tree: Tree, files: Iterable[tuple[Path, str]]) -> None:
    for src, rel in files:
        dest = f"{recipe.GUEST_HUSK_DIR}/{rel}"
        if rel.endswith(".py"):
            add_python_file(tree, src, dest, keep_source=True)
        else:
            tree.add_host_path(src, dest)


def add_modules(
    tree: Tree,
    moddir: Path,
    kernel_version: str,
    selected: list[str],
    boot: list[str],
    index_files: dict[str, str],
) -> None:
    """The ``selected`` modules, their index files (modules.dep, modules.alias) and
    the list of the ``boot`` ones /init loads, in order."""
    base = f"lib/modules/{kernel_version}"
    for rel in selected:
        tree.add_host_path(moddir / rel, f"{base}/{rel}")
    for name, text in index_files.items():
        tree.add(Entry.file(f"{base}/{name}", text.encode()))
    for extra in ("modules.builtin", "modules.order"):
        if (moddir / extra).exists():
            tree.add_host_path(moddir / extra, f"{base}/{extra}")
    tree.add(Entry.file(recipe.GUEST_MODULE_LIST, ("\n".join(boot) + "\n").encode()))


def _resolve_link(tree: Tree, path: str) -> str | None:
    """Follow symlinks inside the tree; the final regular file's path, or None."""
    for _ in range(16):
        entry = tree.get(path)
        if entry is None:
            return None
        if not stat.S_ISLNK(entry.mode):
            return path.strip("/")
        target = entry.data.decode()
        parent = PurePosixPath(path).parent
        path = target if target.startswith("/") else os.path.normpath(str(parent / target))
    return None


def _library_dir(path: str) -> bool:
    parent = str(PurePosixPath(path).parent)
    return parent in LIB_DIRS


def link_libraries(tree: Tree, note: Callable[[str], None]) -> None:
    """Keep exactly the shared libraries the tree's programs need, and prove they are there.

    Every ELF outside the library directories (programs, Python extension modules) has
    its ``DT_NEEDED`` closure resolved against the library directories. An extension
    module whose library is missing is dropped (noted); a program is a ``RecipeError``.
    Libraries nobody needs (libmvec, libBrokenLocale, ...) are removed, except the
    ones in ``recipe.KEEP_LIBRARIES`` (loaded with dlopen).
    """
    by_soname: dict[str, str] = {}
    for path in tree.paths():
        if _library_dir(path):
            by_soname.setdefault(PurePosixPath(path).name, path)
    needed_cache: dict[str, list[str]] = {}

    def needed(path: str) -> list[str]:
        if path not in needed_cache:
            entry = tree.get(path)
            names: list[str] = []
            if entry is not None and is_elf(entry.data):
                try:
                    names = ElfFile(entry.data, path).needed()
                except (NotElfError, IndexError, ValueError, struct_error):
                    names = []
            needed_cache[path] = names
        return needed_cache[path]

    def closure(path: str, keep: set[str]) -> list[str]:
        missing: list[str] = []
        for soname in needed(path):
            link = by_soname.get(soname)
            real = _resolve_link(tree, link) if link else None
            if link is None or real is None:
                missing.append(soname)
                continue
            if link not in keep or real not in keep:
                keep.update((link, real))
                missing += closure(real, keep)
        return missing

    keep: set[str] = set()
    for soname in recipe.KEEP_LIBRARIES:
        link = by_soname.get(soname)
        real = _resolve_link(tree, link) if link else None
        if link and real:
            keep.update((link, real))
            closure(real, keep)
    for path in sorted(tree.paths()):
        entry = tree.get(path)
        if (
            entry is None
            or _library_dir(path)
            or path.startswith("lib/modules/")
            or not stat.S_ISREG(entry.mode)
            or not is_elf(entry.data)
        ):
            continue
        missing = closure(path, keep)
        if not missing:
            continue
        if "/lib-dynload/" in path or path.startswith(recipe.GUEST_DIST_DIR):
            tree.remove(path)
            note(f"dropped {path} (needs {', '.join(missing)})")
        else:
            raise RecipeError(
                f"{path} needs {', '.join(missing)}, which no recipe package provides: "
                "add the library package to PACKAGES in guest/image/recipe.py"
            )
    for path in tree.paths():
        # lib64/ holds the ELF interpreter path every program names (PT_INTERP).
        if _library_dir(path) and path not in keep and not path.startswith("lib64/"):
            entry = tree.get(path)
            if entry is not None and not stat.S_ISDIR(entry.mode):
                tree.remove(path)
