"""``husk containerd-config``: husk's runtime handlers for containerd's CRI plugin.

A Kubernetes RuntimeClass names a CRI runtime handler; containerd's config maps
the handler to a shim (``runtime_type``) and to its options, where husk, like
Kata, takes ``ConfigPath``: the ``configuration.toml`` sandboxes of that handler
use. Two handlers are printed, both passing husk's own pod annotations
(``io.husk.*``) on to the shim:

- ``husk``: the configuration in use (``--config``, ``$HUSK_CONFIG``, ``/etc/husk``).
- ``husk-template``: the same configuration with ``[factory] enable_template``
  on, in ``/etc/husk/configuration-template.toml``: pods start as clones of a
  VM template.
- ``husk-vm`` (containerd 2.x only): the configuration in use with
  ``sandboxer = "shim"``: containerd asks the shim itself for the pod's VM
  through its sandbox API (:mod:`shim.containerd.sandbox_service`), with no
  pause container.

and the CRI plugin's pause image, husk's local one (``husk image pause
--import``). What is printed follows the containerd it configures
(:mod:`shim.containerd.releases`): config version 2 for containerd 1.6/1.7
(``io.containerd.grpc.v1.cri``, ``sandbox_image``), version 3 for 2.x
(``io.containerd.cri.v1.runtime``, ``io.containerd.cri.v1.images``'
``pinned_images.sandbox``, and CNI ``bin_dirs`` with Debian's plugin dir).
``--install`` writes the template configuration and appends what is missing to
containerd's config file in that file's own version, checking that the result
still parses; containerd reads it on restart. A file it rewrites keeps
its mode and owner (a 0600 config with registry credentials stays 0600); one
it makes is 0644, as containerd's package ships it.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import config
from shim.cli import local_images
from shim.containerd.releases import Release
from shim.errors import HuskError
from shim.sandbox.annotations import HUSK_PREFIX

RUNTIME_TYPE = "io.containerd.husk.v2"
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
TEMPLATE_CONFIG = Path("/etc/husk/configuration-template.toml")
#: husk's own pod annotations (``io.husk.config.hypervisor.<key>``), passed on to
#: the shim; the configuration's ``enable_annotations`` says which it takes
ANNOTATIONS = HUSK_PREFIX + "*"
#: where CNI plugins are looked for on containerd 2: its default and Debian's
#: ``containernetworking-plugins``; version 2's single ``bin_dir`` is left alone
CNI_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")


class ContainerdConfigError(HuskError):
    """containerd's config file cannot take husk's handlers."""


@dataclass(frozen=True)
class Layout:
    """Where the CRI settings husk needs live in one containerd config version."""

    version: int
    runtime_plugin: str
    """The plugin whose ``containerd.runtimes`` holds the handlers."""
    image_table: tuple[str, ...]
    """The table (below ``plugins``) holding the pause image's key."""
    image_key: str
    cni_table: tuple[str, ...] | None
    """The table (below ``plugins``) holding ``bin_dirs``; None: left alone."""

    def runtime_base(self, name: str) -> str:
        """The TOML name of handler ``name``'s table."""
        return f'plugins."{self.runtime_plugin}".containerd.runtimes.{name}'


#: containerd 1.6/1.7 (and 2.x, which converts it)
V2 = Layout(2, "io.containerd.grpc.v1.cri", ("io.containerd.grpc.v1.cri",), "sandbox_image", None)
#: containerd 2.x (docs/cri/config.md)
V3 = Layout(
    3,
    "io.containerd.cri.v1.runtime",
    ("io.containerd.cri.v1.images", "pinned_images"),
    "sandbox",
    ("io.containerd.cri.v1.runtime", "cni"),
)
LAYOUTS = {layout.version: layout for layout in (V2, V3)}
#: kept for callers that name the version-2 CRI plugin
CRI = V2.runtime_plugin


@dataclass(frozen=True)
class Handler:
    """One CRI runtime handler for husk."""

    name: str
    config_path: Path
    #: containerd 2's sandboxer for the handler ("": its default, the pause container)
    sandboxer: str = ""

    def table(self, layout: Layout = V2) -> str:
        """The handler's TOML tables in ``layout``'s config version."""
        base = layout.runtime_base(self.name)
        sandboxer = f"  sandboxer = {_string(self.sandboxer)}\n" if self.sandboxer else ""
        return (
            f"[{base}]\n"
            f'  runtime_type = "{RUNTIME_TYPE}"\n'
            f"{sandboxer}"
            f"  pod_annotations = [{_string(ANNOTATIONS)}]\n"
            f"[{base}.options]\n"
            f"  ConfigPath = {_string(str(self.config_path))}\n"
        )


def _string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _table_name(path: tuple[str, ...]) -> str:
    return "plugins." + ".".join(f'"{part}"' if "." in part else part for part in path)


def handlers(
    config_path: Path, template_path: Path = TEMPLATE_CONFIG, layout: Layout = V2
) -> list[Handler]:
    """``husk`` on the given configuration, ``husk-template`` on its template twin,
    and for containerd 2 (version 3) ``husk-vm``, the shim as the pod's sandboxer."""
    found = [Handler("husk", config_path), Handler("husk-template", template_path)]
    if layout.version >= 3:
        found.append(Handler("husk-vm", config_path, sandboxer="shim"))
    return found


def sandbox_image_table(layout: Layout = V2) -> str:
    """The CRI plugin's pause image: husk's local one."""
    return (
        f"[{_table_name(layout.image_table)}]\n"
        f"  {layout.image_key} = {_string(local_images.PAUSE_REFERENCE)}\n"
    )


def cni_table(layout: Layout) -> str:
    """containerd 2's CNI plugin dirs: its default and Debian's (version 3 only)."""
    assert layout.cni_table is not None
    dirs = ", ".join(_string(d) for d in CNI_BIN_DIRS)
    return f"[{_table_name(layout.cni_table)}]\n  bin_dirs = [{dirs}]\n"


def snippet(
    config_path: Path, template_path: Path = TEMPLATE_CONFIG, release: Release | None = None
) -> str:
    """What ``husk containerd-config`` prints: a piece of a containerd config.

    Version 3 for containerd 2.x, version 2 for 1.6/1.7 (the default).
    """
    layout = LAYOUTS[release.config_version if release else 2]
    which = f"containerd {release}" if release else "containerd 1.6/1.7"
    offered = handlers(config_path, template_path, layout)
    names = " or ".join(h.name for h in offered)
    parts = [
        f"# husk runtime handlers for {which}'s CRI plugin (RuntimeClass handler: {names});\n"
        f"# merge into /etc/containerd/config.toml (version = {layout.version})"
        " and\n# restart containerd, or run `husk containerd-config --install`.\n",
        sandbox_image_table(layout),
        *([cni_table(layout)] if layout.cni_table else []),
        *(h.table(layout) for h in offered),
    ]
    return "\n".join(parts)


def template_config_text(cfg: config.Config) -> str:
    """The effective configuration with ``[factory] enable_template = true``."""
    text = config.to_toml(cfg)
    old = "enable_template = false"
    if old in text:
        text = text.replace(old, "enable_template = true", 1)
    return (
        f"# husk-template: {cfg.source} with VM templates on "
        "(written by `husk containerd-config --install`)\n" + text
    )


def _has(document: Mapping[str, Any], *path: str) -> bool:
    node: Any = document
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def merged(
    existing: str, config_path: Path, template_path: Path, release: Release | None = None
) -> tuple[str, list[str]]:
    """``existing`` with what husk needs appended; returns (text, what was added).

    The file's own version (2 or 3) decides where things go; an empty file gets
    ``release``'s (2 when not known). A file ``release`` cannot read is refused.
    """
    try:
        document = tomllib.loads(existing) if existing.strip() else {}
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(f"{CONTAINERD_CONFIG}: not valid TOML: {e}") from None
    default = release.config_version if release else 2
    version = document.get("version", 1 if document else default)
    if version not in LAYOUTS:
        raise ContainerdConfigError(
            f"{CONTAINERD_CONFIG}: config version {version}; husk's handlers need version = 2 "
            "(containerd 1.6/1.7) or 3 (containerd 2)"
        )
    if release is not None and not release.reads(version):
        raise ContainerdConfigError(
            f"{CONTAINERD_CONFIG}: config version {version} is containerd 2's, but containerd "
            f"{release} reads version 2: fix the file or pass the right --containerd-version"
        )
    layout = LAYOUTS[version]
    text = existing if existing.endswith("\n") or not existing else existing + "\n"
    added: list[str] = []
    if not document:
        text += f"version = {layout.version}\n"
    image_table = ("plugins", *layout.image_table)
    if not _has(document, *image_table, layout.image_key):
        name = _table_name(layout.image_table)
        if _has(document, *image_table) and _explicit_table(existing, name):
            raise ContainerdConfigError(
                f"{CONTAINERD_CONFIG}: set {layout.image_key} = "
                f'"{local_images.PAUSE_REFERENCE}" in its [{name}] table, then run this again'
            )
        text += "\n" + sandbox_image_table(layout)
        added.append(f"{layout.image_key} {local_images.PAUSE_REFERENCE}")
    if layout.cni_table and not _has(document, "plugins", *layout.cni_table):
        # an operator's own [cni] table (bin_dirs or not) is theirs to keep
        text += "\n" + cni_table(layout)
        added.append(f"CNI bin_dirs {', '.join(CNI_BIN_DIRS)}")
    runtimes = ("plugins", layout.runtime_plugin, "containerd", "runtimes")
    for handler in handlers(config_path, template_path, layout):
        if _has(document, *runtimes, handler.name):
            continue
        text += "\n" + handler.table(layout)
        added.append(f"handler {handler.name} ({handler.config_path})")
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(f"{CONTAINERD_CONFIG}: merging would break it: {e}") from None
    return text, added


def _explicit_table(text: str, name: str) -> bool:
    """Whether ``text`` opens table ``name`` itself (either quote style, any spacing)."""

    def normal(header: str) -> str:
        return header.replace("'", '"').replace(" ", "").replace("\t", "")

    return any(normal(line.strip()) == f"[{normal(name)}]" for line in text.splitlines())


#: a file husk makes: as Debian's containerd package ships its config.toml
NEW_FILE_MODE = 0o644


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically, keeping an existing file's mode and owner.

    containerd's config may hold registry credentials in a 0600 file: the new
    text must never be readable by anyone the old file was not. The temp file
    is made 0600 and gets the old mode and owner before any text is in it.
    """
    path = Path(os.path.realpath(path))  # a symlinked config stays a symlink
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.stat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = NEW_FILE_MODE, None
    tmp = path.with_name(f".{path.name}.husk-tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(
    cfg: config.Config,
    containerd_config: Path = CONTAINERD_CONFIG,
    template_path: Path = TEMPLATE_CONFIG,
    release: Release | None = None,
) -> list[str]:
    """Write the template configuration and merge the handlers; return what changed."""
    existing = containerd_config.read_text() if containerd_config.exists() else ""
    text, added = merged(existing, cfg.source, template_path, release)
    changes = []
    template_text = template_config_text(cfg)
    if not template_path.exists() or template_path.read_text() != template_text:
        _write(template_path, template_text)
        changes.append(f"wrote {template_path}")
    if added:
        _write(containerd_config, text)
        changes.append(f"{containerd_config}: added {', '.join(added)}")
    return changes
