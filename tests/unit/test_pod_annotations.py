"""A pod sizing its own VM with ``io.husk.config.hypervisor.*`` annotations, where enabled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shim import config
from shim.errors import ConfigError, InvalidArgumentError
from shim.host import HostFacts
from shim.sandbox.annotations import hypervisor_overrides

SECTION: dict[str, Any] = {
    "default_vcpus": 1,
    "default_memory": 512,
    "default_maxvcpus": 4,
    "default_maxmemory": 4096,
    "enable_annotations": ["default_vcpus", "default_memory"],
}
VCPUS = "io.husk.config.hypervisor.default_vcpus"
MEMORY = "io.husk.config.hypervisor.default_memory"


def overrides(annotations: dict[str, str], **section: Any) -> dict[str, int]:
    return hypervisor_overrides(annotations, {**SECTION, **section}, "[hypervisor.qemu]", "pod p")


def test_enabled_keys_set_the_pods_vm_size() -> None:
    assert overrides({VCPUS: "2", MEMORY: "1024"}) == {"default_vcpus": 2, "default_memory": 1024}


def test_other_annotations_are_ignored() -> None:
    assert overrides({"io.kubernetes.cri.sandbox-memory": "1", "io.katacontainers.x": "y"}) == {}


def test_a_key_not_enabled_is_refused_naming_the_config_key() -> None:
    with pytest.raises(InvalidArgumentError, match=r'add "default_memory" to enable_annotations'):
        overrides({MEMORY: "1024"}, enable_annotations=["default_vcpus"])


def test_nothing_is_enabled_by_default() -> None:
    with pytest.raises(InvalidArgumentError, match="not enabled"):
        overrides({VCPUS: "2"}, enable_annotations=[])


def test_an_unknown_husk_annotation_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown annotation io\.husk\.config\.x"):
        overrides({"io.husk.config.x": "1"})


def test_a_size_above_the_maximum_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgumentError, match="default_maxvcpus"):
        overrides({VCPUS: "5"})
    with pytest.raises(InvalidArgumentError, match="default_maxmemory"):
        overrides({MEMORY: "8192"})


def test_a_value_that_is_not_a_whole_number_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="not a whole number"):
        overrides({MEMORY: "1G"})
    with pytest.raises(InvalidArgumentError, match="outside"):
        overrides({VCPUS: "0"})


def test_the_config_refuses_a_key_that_cannot_be_annotated(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor.qemu]\nenable_annotations = ["kernel_params"]\n')
    with pytest.raises(ConfigError, match=r"enable_annotations.*default_vcpus"):
        config.load(path, host=HostFacts.probe())
