"""The guest image recipe: ``husk image build`` makes a kernel + initrd from Debian packages.

Public API (the CLI and ``husk check`` use only these)::

    build_image(output_dir, *, force=False, progress=print) -> ImageManifest
    find_image(output_dir) -> ImageManifest | None
    image_paths(output_dir) -> (kernel, initrd)
"""

from __future__ import annotations

from guest.image.build import DEFAULT_IMAGE_DIR, build_image
from guest.image.errors import (
    AptError,
    CommandError,
    DiskSpaceError,
    ImageBuildError,
    RecipeError,
    ToolMissingError,
)
from guest.image.manifest import (
    BUSYBOX_NAME,
    INITRD_NAME,
    KERNEL_NAME,
    MANIFEST_NAME,
    ImageManifest,
    find_image,
    image_paths,
)

__all__ = [
    "BUSYBOX_NAME",
    "DEFAULT_IMAGE_DIR",
    "INITRD_NAME",
    "KERNEL_NAME",
    "MANIFEST_NAME",
    "AptError",
    "CommandError",
    "DiskSpaceError",
    "ImageBuildError",
    "ImageManifest",
    "RecipeError",
    "ToolMissingError",
    "build_image",
    "find_image",
    "image_paths",
]
