"""Hot-adding 1 vCPU and 256 MiB to a running sandbox VM, against its cold boot.

    python -m bench.hotplug [--rounds 5]

Each round boots a sandbox VM as the shim does (the configured plugin, the
configured ``default_vcpus``/``default_memory``, room for one more vCPU and
256 MiB) and records:

1. **cold boot**: ``prepare`` to the guest agent's first answered Health.Check
   (the baseline: what a new sandbox costs instead);
2. **hot-add**: ``Hypervisor.resize`` by +1 vCPU and +256 MiB, which returns
   once QEMU reports the guest's virtio-mem driver has plugged all 256 MiB (the
   guest onlines it by itself: ``memhp_default_state``), then the agent's
   ``OnlineCPUMem`` until the guest has every vCPU online: the path a
   container create or a task ``Update`` takes before the cgroup is set.

Prints each round, both medians and their ratio, and the size the VM reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

import trio

from shim import config, registry
from shim.agent.client import wait_ready
from shim.host import HostFacts
from shim.hypervisor import VmSize
from shim.sandbox import factory
from shim.sandbox.state import SandboxState

ADD_MIB = 256


async def one_round(cfg: config.Config, state_root: Path) -> tuple[float, float, float, VmSize]:
    """(cold boot s, resize s, OnlineCPUMem s, the size the VM reports after)."""
    plugin = registry.lookup(cfg.runtime.hypervisor)
    section = cfg.hypervisor
    state = SandboxState.create(state_root, "hp-" + uuid.uuid4().hex[:8])
    state.shared_dir.mkdir()
    spec = factory.vm_spec(cfg, state)
    spec = dataclasses.replace(
        spec, max_vcpus=spec.vcpus + 1, max_memory_mib=spec.memory_mib + ADD_MIB
    )
    hypervisor = plugin.create(section)
    started = trio.current_time()
    try:
        await hypervisor.prepare(spec)
        await hypervisor.start(float(section.get("boot_timeout", 30)))
        async with wait_ready(hypervisor.agent_endpoint(), cfg.agent.dial_timeout) as agent:
            boot = trio.current_time() - started
            started = trio.current_time()
            size = await hypervisor.resize(spec.vcpus + 1, spec.memory_mib + ADD_MIB)
            resized = trio.current_time()
            await agent.online_cpu_mem(size.vcpus, cpu_only=False)
            online = trio.current_time()
            size = await hypervisor.size()
    finally:
        with trio.CancelScope(shield=True):
            await hypervisor.destroy()
            shutil.rmtree(state.dir, ignore_errors=True)
    return boot, resized - started, online - resized, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.hotplug: run as root")
    state_root = Path(tempfile.mkdtemp(prefix="hp-", dir="/tmp"))
    cfg = config.load(config.locate(), host=HostFacts.probe())
    boots, resizes, onlines = [], [], []
    try:
        for i in range(args.rounds):
            boot, resize, online, size = trio.run(one_round, cfg, state_root)
            boots.append(boot)
            resizes.append(resize)
            onlines.append(online)
            print(f"round {i + 1}: cold boot {boot:.2f} s  hot-add {resize + online:.3f} s "
                  f"(resize {resize:.3f} + online {online:.3f})  "
                  f"now {size.vcpus} vCPUs, {size.memory_mib} MiB", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    boot = statistics.median(boots)
    add = statistics.median(r + o for r, o in zip(resizes, onlines, strict=True))
    print(f"hypervisor: {cfg.runtime.hypervisor} ({cfg.hypervisor.get('accel', '?')})")
    print(f"cold boot to agent ready, median: {boot:.3f} s")
    print(f"hot-add 1 vCPU + {ADD_MIB} MiB until online in the guest, median: {add:.3f} s "
          f"(resize {statistics.median(resizes):.3f} s, "
          f"OnlineCPUMem {statistics.median(onlines):.3f} s)")  # fmt: skip
    print(f"ratio hot-add / cold boot: {add / boot:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
