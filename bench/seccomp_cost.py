"""What QEMU's seccomp filter (``seccompsandbox``) costs a sandbox's boot.

    python -m bench.seccomp_cost [--rounds 5]

Each round boots the configured VM twice through the qemu plugin, with the
default ``seccompsandbox`` and with it turned off (alternating, so load on
the machine hits both alike), and times ``prepare`` to the agent's first
answered Health.Check. Prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
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
from shim.sandbox import factory
from shim.sandbox.state import SandboxState


async def boot(cfg: config.Config, state_root: Path, seccomp: bool) -> float:
    """Seconds from ``prepare`` to the agent's first answer."""
    section = dict(cfg.hypervisor)
    if not seccomp:
        section["seccompsandbox"] = ""
    state = SandboxState.create(state_root, "sc-" + uuid.uuid4().hex[:8])
    state.shared_dir.mkdir()
    hypervisor = registry.lookup(cfg.runtime.hypervisor).create(section)
    started = trio.current_time()
    try:
        await hypervisor.prepare(factory.vm_spec(cfg, state))
        await hypervisor.start(float(section["boot_timeout"]))
        async with wait_ready(hypervisor.agent_endpoint(), cfg.agent.dial_timeout):
            return trio.current_time() - started
    finally:
        with trio.CancelScope(shield=True):
            await hypervisor.destroy()
            shutil.rmtree(state.dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.seccomp_cost: run as root")
    root = Path(tempfile.mkdtemp(prefix="hsc-", dir="/tmp"))
    try:
        cfg = config.load(host=HostFacts.probe())
        on, off = [], []
        for i in range(args.rounds):
            on.append(trio.run(boot, cfg, root, True))
            off.append(trio.run(boot, cfg, root, False))
            print(f"round {i + 1}: with -sandbox {on[-1]:.2f}s  without {off[-1]:.2f}s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    with_, without = statistics.median(on), statistics.median(off)
    print(f"boot to agent, with seccompsandbox: {with_:.3f} s")
    print(f"boot to agent, without: {without:.3f} s")
    print(f"ratio with / without: {with_ / without:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
