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

and the CRI plugin's ``sandbox_image``, husk's local pause image
(``husk image pause --import``). ``--install`` writes the template
configuration and appends what is missing to containerd's config file (version
2), checking that the result still parses; containerd reads it on restart. A
file it rewrites keeps its mode and owner (a 0600 config with registry
credentials stays 0600); one it makes is 0644, as containerd's package ships it.
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
from shim.errors import HuskError
from shim.sandbox.annotations import HUSK_PREFIX

CRI = "io.containerd.grpc.v1.cri"
RUNTIME_TYPE = "io.containerd.husk.v2"
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
TEMPLATE_CONFIG = Path("/etc/husk/configuration-template.toml")
#: husk's own pod annotations (``io.husk.config.hypervisor.<key>``), passed on to
#: the shim; the configuration's ``enable_annotations`` says which it takes
ANNOTATIONS = HUSK_PREFIX + "*"


class ContainerdConfigError(HuskError):
    """containerd's config file cannot take husk's handlers."""


@dataclass(frozen=True)
class Handler:
    """One CRI runtime handler for husk."""

    name: str
    config_path: Path

    def table(self) -> str:
        """The handler's TOML tables (containerd config version 2)."""
        base = f'plugins."{CRI}".containerd.runtimes.{self.name}'
        return (
            f"[{base}]\n"
            f'  runtime_type = "{RUNTIME_TYPE}"\n'
            f"  pod_annotations = [{_string(ANNOTATIONS)}]\n"
            f"[{base}.options]\n"
            f"  ConfigPath = {_string(str(self.config_path))}\n"
        )


def _string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def handlers(config_path: Path, template_path: Path = TEMPLATE_CONFIG) -> list[Handler]:
    """``husk`` on the given configuration, ``husk-template`` on its template twin."""
    return [Handler("husk", config_path), Handler("husk-template", template_path)]


def sandbox_image_table() -> str:
    """The CRI plugin's pause image: husk's local one."""
    return f'[plugins."{CRI}"]\n  sandbox_image = {_string(local_images.PAUSE_REFERENCE)}\n'


def snippet(config_path: Path, template_path: Path = TEMPLATE_CONFIG) -> str:
    """What ``husk containerd-config`` prints: a piece of a version-2 containerd config."""
    parts = [
        "# husk runtime handlers for containerd's CRI plugin (RuntimeClass handler: husk or\n"
        "# husk-template); merge into /etc/containerd/config.toml (version = 2) and restart\n"
        "# containerd, or run `husk containerd-config --install`.\n",
        sandbox_image_table(),
        *(h.table() for h in handlers(config_path, template_path)),
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


def merged(existing: str, config_path: Path, template_path: Path) -> tuple[str, list[str]]:
    """``existing`` with what husk needs appended; returns (text, what was added)."""
    try:
        document = tomllib.loads(existing) if existing.strip() else {}
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(f"{CONTAINERD_CONFIG}: not valid TOML: {e}") from None
    version = document.get("version", 1 if document else 2)
    if version != 2:
        raise ContainerdConfigError(
            f"{CONTAINERD_CONFIG}: config version {version}; husk's handlers need version = 2"
        )
    text = existing if existing.endswith("\n") or not existing else existing + "\n"
    added: list[str] = []
    if not document:
        text += "version = 2\n"
    cri = ("plugins", CRI)
    if not _has(document, *cri, "sandbox_image"):
        if _has(document, *cri) and _explicit_table(existing, f'plugins."{CRI}"'):
            raise ContainerdConfigError(
                f'{CONTAINERD_CONFIG}: set sandbox_image = "{local_images.PAUSE_REFERENCE}" '
                f'in its [plugins."{CRI}"] table, then run this again'
            )
        text += "\n" + sandbox_image_table()
        added.append(f"sandbox_image {local_images.PAUSE_REFERENCE}")
    for handler in handlers(config_path, template_path):
        if _has(document, *cri, "containerd", "runtimes", handler.name):
            continue
        text += "\n" + handler.table()
        added.append(f"handler {handler.name} ({handler.config_path})")
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ContainerdConfigError(f"{CONTAINERD_CONFIG}: merging would break it: {e}") from None
    return text, added


def _explicit_table(text: str, name: str) -> bool:
    return any(line.strip() == f"[{name}]" for line in text.splitlines())


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
) -> list[str]:
    """Write the template configuration and merge the handlers; return what changed."""
    existing = containerd_config.read_text() if containerd_config.exists() else ""
    text, added = merged(existing, cfg.source, template_path)
    changes = []
    template_text = template_config_text(cfg)
    if not template_path.exists() or template_path.read_text() != template_text:
        _write(template_path, template_text)
        changes.append(f"wrote {template_path}")
    if added:
        _write(containerd_config, text)
        changes.append(f"{containerd_config}: added {', '.join(added)}")
    return changes
