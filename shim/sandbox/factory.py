"""Making a sandbox from the configuration: its plugin, state dir, VM spec and network.

The serving shim calls :func:`sandbox_factory` once and the task service calls
the result for the one sandbox it boots. Everything the configuration decides
about a sandbox is read here, so the sandbox itself sees only what it needs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shim import registry
from shim.config import Config
from shim.errors import HostError
from shim.host import HostFacts
from shim.hypervisor import VmSpec
from shim.sandbox import rootfs
from shim.sandbox.annotations import hypervisor_overrides
from shim.sandbox.boot import BootedVm
from shim.sandbox.boot_slots import BootSlots, slot_count
from shim.sandbox.pod_network import SandboxNetwork
from shim.sandbox.sandbox import Sandbox
from shim.sandbox.state import SandboxState
from shim.sandbox.template import VmTemplate

#: the guest agent logs at debug level when its kernel command line says so
AGENT_DEBUG_PARAM = "husk.debug=1"
#: the guest agent serves its debug console when its kernel command line says so
DEBUG_CONSOLE_PARAM = "husk.debug_console=1"

#: makes the (not yet booted) sandbox with this id on this pod netns (None: loopback
#: only), from the annotations of the container that owns it
SandboxFactory = Callable[[str, str | None, Mapping[str, Any]], Sandbox]


def kernel_params(config: Config) -> str:
    """The configured guest kernel parameters, plus the agent's debug switches."""
    params = [str(config.hypervisor.get("kernel_params", ""))]
    if config.agent.enable_debug:
        params.append(AGENT_DEBUG_PARAM)
    if config.agent.debug_console:
        params.append(DEBUG_CONSOLE_PARAM)
    return " ".join(p for p in params if p)


def vm_spec(config: Config, state: SandboxState) -> VmSpec:
    """The VM a sandbox asks its plugin for, from the selected ``[hypervisor.*]`` section."""
    section = config.hypervisor
    initrd = section.get("initrd") or ""
    return VmSpec(
        sandbox_id=state.id,
        state_dir=state.dir,
        vcpus=int(section["default_vcpus"]),
        memory_mib=int(section["default_memory"]),
        kernel=Path(section["kernel"]),
        initrd=Path(initrd) if initrd else None,
        kernel_params=kernel_params(config),
        shared_fs=rootfs.shared_fs_device(str(section["shared_fs"]), state.shared_dir),
        agent_transport=config.agent.transport,
        record=state.record,
        debug_console=config.agent.debug_console,
        max_vcpus=int(section.get("default_maxvcpus", 0)),
        max_memory_mib=int(section.get("default_maxmemory", 0)),
    )


def sandbox_factory(
    config: Config, namespace: str, booted: BootedVm | None = None
) -> SandboxFactory:
    """Return ``make(sandbox_id, netns) -> Sandbox`` for the configured hypervisor.

    ``booted``: a VM the first sandbox made takes over instead of starting one
    (the VM pool's, already in that sandbox's state dir).
    """
    unclaimed = [booted] if booted is not None else []

    def make(sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]) -> Sandbox:
        plugin = registry.lookup(config.runtime.hypervisor)
        section = config.hypervisor
        overrides = hypervisor_overrides(
            annotations,
            section,
            f"[hypervisor.{config.runtime.hypervisor}] of {config.source}",
            f"sandbox {sandbox_id}",
        )
        problems = plugin.unmet_requirements(section, HostFacts.probe())
        if problems:
            raise HostError(f"cannot start sandbox {sandbox_id}: " + "; ".join(problems))
        vm = unclaimed.pop() if unclaimed else None
        if vm is not None and vm.state.id == sandbox_id:
            hypervisor, state = vm.hypervisor, vm.state
        else:
            vm = None
            hypervisor = plugin.create(section)
            state = SandboxState.create(config.runtime.state_dir, sandbox_id, namespace)
        state.claim(os.getpid())
        spec = vm_spec(config, state)
        spec = dataclasses.replace(
            spec,
            vcpus=overrides.get("default_vcpus", spec.vcpus),
            memory_mib=overrides.get("default_memory", spec.memory_mib),
        )
        state.describe_vm(plugin.name, spec.vcpus, spec.memory_mib)
        if config.runtime.internetworking_model == "none":
            netns = None
        return Sandbox(
            state,
            hypervisor,
            spec,
            boot_timeout=float(section["boot_timeout"]),
            dial_timeout=config.agent.dial_timeout,
            request_timeout=config.agent.request_timeout,
            network=SandboxNetwork(netns, state),
            slots=boot_slots(config),
            template=vm_template(config) if config.factory.enable_template else None,
            booted=vm,
        )

    return make


def boot_slots(config: Config) -> BootSlots:
    """The host's boot slots, shared by every shim of this state dir."""
    return BootSlots(config.runtime.state_dir, slot_count(config.runtime.max_parallel_boots))


def vm_template(config: Config) -> VmTemplate:
    """The VM template of this configuration (``[factory]``)."""
    plugin = registry.lookup(config.runtime.hypervisor)
    return VmTemplate(
        config,
        lambda: plugin.create(config.hypervisor),
        lambda state: vm_spec(config, state),
        boot_slots(config),
    )
