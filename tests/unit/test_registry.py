"""The hypervisor registry: built-ins, lookup errors, name clashes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from shim import registry
from shim.config.schema import Key
from shim.errors import ConfigError, HuskError
from shim.hypervisor import Hypervisor, HypervisorPlugin


def test_builtin_plugins_are_registered() -> None:
    assert {"qemu", "cloud-hypervisor", "builtin"} <= set(registry.names())


def test_lookup_returns_the_plugin_by_name() -> None:
    assert registry.lookup("qemu").name == "qemu"


def test_unknown_name_lists_registered_plugins() -> None:
    with pytest.raises(ConfigError, match=r"unknown hypervisor 'nope'; registered: .*qemu"):
        registry.lookup("nope")


class _Clash(HypervisorPlugin):
    name = "qemu"

    @property
    def keys(self) -> Sequence[Key]:
        return ()

    def create(self, config: Mapping[str, Any]) -> Hypervisor:
        raise NotImplementedError


def test_a_second_plugin_with_a_taken_name_is_refused() -> None:
    registry.names()
    with pytest.raises(HuskError, match=r"name 'qemu' is taken by plugins\.qemu"):
        registry.register(_Clash())
