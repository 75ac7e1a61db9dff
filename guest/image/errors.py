"""Errors of ``husk image build``: each is one line that names what failed and what to do."""

from __future__ import annotations

from common.errors import FailedPreconditionError


class ImageBuildError(FailedPreconditionError):
    """Building the guest kernel + initrd failed; partial output has been removed."""


class ToolMissingError(ImageBuildError):
    """A host program the build needs (apt-get, dpkg-deb, ...) is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        self.tool = tool
        self.package = package
        super().__init__(
            f"image build needs '{tool}', which is not on PATH: install the Debian package "
            f"'{package}'"
        )


class AptError(ImageBuildError):
    """apt-get / apt-cache could not resolve or download a package."""


class CommandError(ImageBuildError):
    """A build command (dpkg-deb, zstd, ...) exited with an error."""


class DiskSpaceError(ImageBuildError):
    """Not enough free space in the image directory for the build."""


class RecipeError(ImageBuildError):
    """The packages do not hold what the recipe expects (module, library, file)."""
