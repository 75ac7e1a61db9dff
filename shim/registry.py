"""The hypervisor plugin registry.

Built-in plugins (``qemu``, ``cloud-hypervisor``, ``builtin``) register
themselves when their module is imported; the registry imports them by name on
first use, so ``shim`` has no static dependency on ``plugins``. Third-party
plugins are found through the entry-point group ``husk.hypervisors``: each entry
point names a ``HypervisorPlugin`` instance (or a class to instantiate), so a
VMM can be added with ``pip install`` and no edit to husk.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from shim.errors import ConfigError, HuskError
from shim.hypervisor import HypervisorPlugin

__all__ = ["ENTRY_POINT_GROUP", "HypervisorPlugin", "lookup", "names", "register"]

ENTRY_POINT_GROUP = "husk.hypervisors"
BUILTIN_MODULES = ("plugins.qemu", "plugins.cloud_hypervisor", "plugins.builtin")

log = logging.getLogger("husk.registry")
_plugins: dict[str, HypervisorPlugin] = {}
_discovered = False


def register(plugin: HypervisorPlugin) -> HypervisorPlugin:
    """Add a plugin under its ``name``; a second plugin with that name is an error."""
    existing = _plugins.get(plugin.name)
    if existing is not None and type(existing) is not type(plugin):
        raise HuskError(
            f"hypervisor plugin name '{plugin.name}' is taken by "
            f"{type(existing).__module__}.{type(existing).__qualname__}"
        )
    _plugins[plugin.name] = plugin
    return plugin


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party plugin must not break husk
            log.warning("hypervisor plugin entry point %r failed to load: %s", ep.value, e)
            continue
        plugin = obj() if isinstance(obj, type) else obj
        if not isinstance(plugin, HypervisorPlugin):
            log.warning("entry point %r is not a HypervisorPlugin; ignored", ep.value)
            continue
        if plugin.name != ep.name:
            log.warning(
                "entry point %r registers plugin named %r; using the plugin's name",
                ep.name,
                plugin.name,
            )
        register(plugin)


def names() -> list[str]:
    """Names of every registered plugin, sorted."""
    _discover()
    return sorted(_plugins)


def lookup(name: str, *, context: str = "hypervisor") -> HypervisorPlugin:
    """The plugin called ``name``; an unknown name lists the registered ones."""
    _discover()
    try:
        return _plugins[name]
    except KeyError:
        raise ConfigError(
            f"{context}: unknown hypervisor '{name}'; registered: " + ", ".join(names())
        ) from None
