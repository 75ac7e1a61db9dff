"""The Hypervisor interface: optional operations fail naming plugin and operation."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import NotSupportedError
from shim.hypervisor import (
    AgentEndpoint,
    BlockDevice,
    Capabilities,
    Hypervisor,
    SerialEndpoint,
    VmSpec,
    VmState,
)
from ttrpc.codes import Code


class Minimal(Hypervisor):
    name = "minimal"

    def capabilities(self) -> Capabilities:
        return Capabilities(virtio_serial=True)

    async def prepare(self, spec: VmSpec) -> None:
        pass

    async def start(self, timeout: float) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def destroy(self) -> None:
        pass

    async def state(self) -> VmState:
        return VmState.RUNNING

    def agent_endpoint(self) -> AgentEndpoint:
        return SerialEndpoint(Path("/tmp/x.sock"))


async def test_unsupported_resize_names_plugin_and_operation() -> None:
    with pytest.raises(
        NotSupportedError, match=r"^hypervisor 'minimal' does not support resizing the VM$"
    ):
        await Minimal().resize(2, 1024)


async def test_unsupported_hot_add_names_the_device_kind() -> None:
    with pytest.raises(NotSupportedError, match=r"hot-add of BlockDevice"):
        await Minimal().add_device(BlockDevice(id="d0", path=Path("/x.img")))


async def test_unsupported_template_save_maps_to_unimplemented() -> None:
    with pytest.raises(NotSupportedError) as err:
        await Minimal().save_template()
    assert err.value.code is Code.UNIMPLEMENTED
    assert (err.value.plugin, err.value.operation) == ("minimal", "saving a VM template")
