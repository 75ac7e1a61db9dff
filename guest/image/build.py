"""``husk image build``: Debian packages -> kernel, ``root.img`` + ``root-initrd.img``
(the shared root image and its loader), ``initrd.img`` (the same guest as an
initramfs), ``busybox`` (the guest's static busybox, for a rootfs the host makes)
and ``manifest.json``.

The build works in a temporary directory inside the output directory and moves the
finished artefacts into place at the end (manifest last), so a reader never sees a
manifest that does not match its files; any failure removes the temporary directory.
"""

from __future__ import annotations

import errno
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from guest.image import initrd, kernel, packages, recipe, rootfs, rootimage
from guest.image.cpio import Entry
from guest.image.elf import ElfFile, NotElfError
from guest.image.errors import DiskSpaceError, ImageBuildError, RecipeError, ToolMissingError
from guest.image.manifest import (
    BUSYBOX_NAME,
    INITRD_NAME,
    KERNEL_NAME,
    LOADER_NAME,
    MANIFEST_NAME,
    ROOT_IMAGE_NAME,
    VMLINUX_NAME,
    Artefact,
    ImageManifest,
    inputs_digest,
    is_current,
)
from guest.image.modules import ModuleIndex
from guest.image.packages import Runner

DEFAULT_IMAGE_DIR = Path("/var/lib/husk/images")
REPO_ROOT = Path(__file__).resolve().parents[2]
INIT_SCRIPT = REPO_ROOT / "guest" / "init" / "init.sh"
LOADER_SCRIPT = REPO_ROOT / "guest" / "init" / "loader.sh"
STEPS = 10
MiB = 1024 * 1024


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


class _Steps:
    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress = progress
        self.n = 0
        self.t = time.monotonic()

    def done(self, name: str, detail: str = "") -> None:
        self.n += 1
        now = time.monotonic()
        sep = ": " if detail else ""
        self.progress(f"[{self.n}/{STEPS}] {name}{sep}{detail}, {now - self.t:.1f} s")
        self.t = now


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _preflight(output_dir: Path, min_free_bytes: int) -> None:
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "mkfs.erofs"):
        if packages.tool_path(tool) is None:
            raise ToolMissingError(tool, packages.TOOL_PACKAGES[tool])
    where = _existing_ancestor(output_dir)
    free = shutil.disk_usage(where).free
    if free < min_free_bytes:
        raise DiskSpaceError(
            f"not enough disk space for the image build in {where}: {_mib(free)} free, "
            f"{_mib(min_free_bytes)} needed; free space or pass another image directory"
        )


def _recipe_files(husk_files: list[tuple[Path, str]]) -> list[tuple[str, bytes]]:
    files = {rel: src for src, rel in husk_files}
    for src in sorted((REPO_ROOT / "guest" / "image").glob("*.py")):
        files.setdefault(src.relative_to(REPO_ROOT).as_posix(), src)
    for src in sorted((REPO_ROOT / "guest" / "init").iterdir()):
        if src.is_file():
            files.setdefault(src.relative_to(REPO_ROOT).as_posix(), src)
    return [(rel, src.read_bytes()) for rel, src in sorted(files.items())]


def _dist_versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in recipe.PYTHON_DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise RecipeError(
                f"Python package '{name}' is not installed on this host: pip install {name}"
            ) from None
    return out


def write_busybox(staging: Path, dest: Path) -> None:
    """Copy the staged static busybox to ``dest``, executable (mode 0755).

    The VM pool copies it into a rootfs of its own, which holds no libraries:
    a busybox that needs any is refused.
    """
    source = staging / "bin" / "busybox"
    try:
        needed = ElfFile.read(source).needed()
    except NotElfError as e:
        raise RecipeError(f"the staged busybox is not a binary this build can read: {e}") from e
    if needed:
        raise RecipeError(
            f"the staged busybox is not static (it needs {', '.join(needed)}): "
            "the recipe must install busybox-static"
        )
    shutil.copyfile(source, dest)
    dest.chmod(0o755)


def artefact_records(out: Path, names: list[str]) -> dict[str, Artefact]:
    """The manifest's record (sha256 and size) of each named file in ``out``."""
    return {
        name: Artefact(packages.sha256_file(out / name), (out / name).stat().st_size)
        for name in names
    }


@dataclass(frozen=True)
class BuildPlan:
    """The resolved inputs of a build and their digest (decides whether to rebuild)."""

    kernel_package: str
    debs: list[packages.Deb]
    python_distributions: dict[str, str]
    husk_files: list[tuple[Path, str]]
    digest: str


def make_plan(run: Runner, workdir: Path, compression: str) -> BuildPlan:
    """Resolve package versions (apt, no download) and hash every input of the build.

    ``workdir`` must be empty (apt-get leaves out packages already downloaded there).
    """
    kernel_pkg = packages.resolve_kernel_package(run, workdir, recipe.KERNEL_META_PACKAGE)
    debs = packages.resolve(run, workdir, [kernel_pkg, *recipe.PACKAGES])
    dists = _dist_versions()
    husk_files = rootfs.husk_source_files(REPO_ROOT)
    digest = inputs_digest(
        {d.name: d.version for d in debs},
        dists,
        _recipe_files(husk_files),
        {
            "python": sys.version.split()[0],
            "compression": compression,
            "zstd": str(shutil.which("zstd") is not None),
        },
    )
    return BuildPlan(kernel_pkg, debs, dists, husk_files, digest)


def build_image(
    output_dir: Path = DEFAULT_IMAGE_DIR,
    *,
    force: bool = False,
    progress: Callable[[str], None] = print,
    runner: Runner | None = None,
    min_free_bytes: int = recipe.MIN_FREE_BYTES,
    compression: str = recipe.INITRD_COMPRESSION,
) -> ImageManifest:
    """Build (or reuse) the guest image in ``output_dir`` and return its manifest.

    ``compression`` is "none" (fastest boot under TCG), "zstd" or "gzip"; it falls
    back to what the kernel and host support. Raises an ``ImageBuildError`` (a
    ``common.errors.FailedPreconditionError``) with a one-line message on any
    failure; partial output is removed.
    """
    run = runner or packages.subprocess_runner()
    output_dir = output_dir.absolute()
    started = time.monotonic()
    steps = _Steps(progress)
    if compression not in initrd.COMPRESSIONS:
        choices = ", ".join(initrd.COMPRESSIONS)
        raise ImageBuildError(f"unknown initrd compression '{compression}': use one of {choices}")
    _preflight(output_dir, min_free_bytes)
    steps.done("check host", f"apt-get, dpkg-deb, mkfs.erofs present, {output_dir}")

    created = not output_dir.exists()
    tmp: Path | None = None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=output_dir))
        return _build(output_dir, tmp, run, steps, force, started, progress, compression)
    except ImageBuildError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(
                f"disk full while building the image in {output_dir}: free space and retry"
            ) from e
        raise ImageBuildError(f"image build failed in {output_dir}: {e}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()


def _build(
    output_dir: Path,
    tmp: Path,
    run: Runner,
    steps: _Steps,
    force: bool,
    started: float,
    progress: Callable[[str], None],
    compression: str,
) -> ImageManifest:
    debdir = tmp / "debs"
    debdir.mkdir()
    plan = make_plan(run, debdir, compression)
    kernel_pkg, debs, digest = plan.kernel_package, plan.debs, plan.digest
    versions = {d.name: d.version for d in debs}
    dists, husk_files = plan.python_distributions, plan.husk_files
    steps.done("resolve packages", f"{len(debs)} packages, kernel {kernel_pkg}")

    current = is_current(output_dir, digest)
    if current is not None and not force:
        progress(f"image in {output_dir} is up to date (inputs unchanged); skipping the build")
        return current

    deb_paths = packages.fetch(run, debdir, debs)
    total = sum(p.stat().st_size for p in deb_paths)
    steps.done("fetch packages", f"{len(deb_paths)} debs, {_mib(total)}")

    staging = tmp / "root"
    packages.extract(run, deb_paths, staging)
    for p in deb_paths:
        p.unlink()
    steps.done("extract packages", f"{len(deb_paths)} debs")

    kernel_version = kernel_pkg.removeprefix("linux-image-")
    moddir = staging / "lib" / "modules" / kernel_version
    vmlinuz = staging / "boot" / f"vmlinuz-{kernel_version}"
    config = staging / "boot" / f"config-{kernel_version}"
    if not moddir.is_dir() or not vmlinuz.is_file():
        raise RecipeError(f"{kernel_pkg} holds no vmlinuz or modules for {kernel_version}")
    index = ModuleIndex.scan(moddir)
    boot = index.resolve(recipe.KERNEL_MODULES, recipe.MODULE_ALIASES)
    selected = index.resolve(
        (*recipe.KERNEL_MODULES, *recipe.ON_DEMAND_MODULES), recipe.MODULE_ALIASES
    )
    steps.done(
        "select kernel modules",
        f"{len(selected)} modules for {kernel_version}, {len(boot)} loaded at boot",
    )

    tree = rootfs.Tree()
    rootfs.add_base(tree, INIT_SCRIPT.read_bytes())
    applets = run([str(staging / "bin" / "busybox"), "--list-full"], staging).split()
    rootfs.add_busybox(tree, staging, applets)
    rootfs.add_libraries(tree, staging)
    py = f"usr/bin/python{recipe.PYTHON_VERSION}"
    rootfs.add_binaries(tree, staging, [py, "usr/sbin/runc", "usr/bin/crun"])
    tree.add(Entry.symlink("usr/bin/python3", f"python{recipe.PYTHON_VERSION}"))
    rootfs.add_stdlib(tree, staging)
    rootfs.add_distributions(tree, recipe.PYTHON_DISTRIBUTIONS)
    rootfs.add_husk(tree, husk_files)
    index_files = {
        "modules.dep": index.modules_dep(selected),
        "modules.alias": index.modules_alias(selected),
    }
    rootfs.add_modules(tree, moddir, kernel_version, selected, boot, index_files)
    rootfs.link_libraries(tree, lambda msg: progress(f"      {msg}"))
    pyc = "precompiled .pyc" if rootfs.CAN_COMPILE else "sources only (host is not 3.11)"
    steps.done("assemble rootfs", f"{len(tree)} entries, {_mib(tree.size())}, {pyc}")

    out = tmp / "out"
    out.mkdir()
    config_text = config.read_text() if config.exists() else ""
    compression = initrd.choose_compression(config_text, compression)
    raw_size = initrd.write_initrd(run, tree, out / INITRD_NAME, compression)
    size = (out / INITRD_NAME).stat().st_size
    steps.done("write initrd", f"{compression}, {_mib(raw_size)} -> {_mib(size)}")

    image_size = rootimage.write_root_image(run, tree, out / ROOT_IMAGE_NAME)
    loader_modules = index.resolve(recipe.ROOT_MODULES, recipe.MODULE_ALIASES)
    loader = rootimage.loader_tree(
        staging, moddir, kernel_version, loader_modules, LOADER_SCRIPT.read_bytes()
    )
    loader_size = initrd.write_initrd(run, loader, out / LOADER_NAME, "none")
    steps.done(
        "write root image",
        f"erofs {_mib(image_size)}; loader {_mib(loader_size)}, {len(loader_modules)} modules",
    )

    write_busybox(staging, out / BUSYBOX_NAME)
    bzimage = vmlinuz.read_bytes()
    (out / KERNEL_NAME).write_bytes(bzimage)
    names = [KERNEL_NAME, INITRD_NAME, ROOT_IMAGE_NAME, LOADER_NAME, BUSYBOX_NAME]
    elf = kernel.extract_vmlinux(bzimage)
    if elf is not None:
        (out / VMLINUX_NAME).write_bytes(elf)
        names.append(VMLINUX_NAME)
    pvh = "vmlinux (PVH ELF) extracted" if elf is not None else "no PVH entry: vmlinuz only"
    steps.done("kernel", f"{pvh}, {_mib(len(elf or bzimage))}")
    artefacts = artefact_records(out, names)
    manifest = ImageManifest(
        kernel_version=kernel_version,
        compression=compression,
        inputs_digest=digest,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.monotonic() - started, 1),
        packages=versions,
        python_distributions=dists,
        modules=[m.rsplit("/", 1)[-1] for m in selected],
        artefacts=artefacts,
        initrd_uncompressed_size=raw_size,
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    (output_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (output_dir / VMLINUX_NAME).unlink(missing_ok=True)
    for name in [*names, MANIFEST_NAME]:
        (out / name).replace(output_dir / name)
    listing = ", ".join(f"{n} {_mib(a.size)}" for n, a in artefacts.items())
    steps.done("install", f"{output_dir}: {listing}; total {time.monotonic() - started:.1f} s")
    return manifest
