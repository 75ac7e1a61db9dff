"""The one version line ``husk --version`` and ``containerd-shim-husk-v2 -v`` both print.

It names husk's distribution version and, when a guest image is built in the
configured ``image_dir``, the kernel that image boots. The image's manifest is
read by the recipe's own ``find_image``, imported here lazily: the serving shim
never loads ``guest`` (it runs a VM from files, not the recipe).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

DISTRIBUTION = "husk-runtime"


def husk_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare tree)."""
    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def guest_kernel(image_dir: Path) -> str | None:
    """The kernel version of the guest image built in ``image_dir``, or None."""
    from guest.image.manifest import find_image

    manifest = find_image(image_dir)
    return manifest.kernel_version if manifest is not None else None


def version_line(image_dir: Path) -> str:
    """``husk 0.1.0, guest kernel 6.1.0-28-amd64 (/var/lib/husk/images)``."""
    kernel = guest_kernel(image_dir)
    image = f"guest kernel {kernel}" if kernel else "no guest image built"
    return f"husk {husk_version()}, {image} ({image_dir})"


def configured_image_dir(config_path: Path | None = None) -> Path:
    """``[runtime] image_dir`` of the effective config; its default if the config is broken."""
    from shim import config
    from shim.errors import HuskError

    try:
        return config.load(config_path).runtime.image_dir
    except HuskError:
        return Path(next(k.default for k in config.RUNTIME_KEYS if k.name == "image_dir"))
