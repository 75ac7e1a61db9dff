"""The built-in, Dragonball-like in-process VMM; registers as ``builtin``."""

from plugins.builtin.plugin import PLUGIN, BuiltinPlugin
from shim.registry import register

register(PLUGIN)

__all__ = ["PLUGIN", "BuiltinPlugin"]
