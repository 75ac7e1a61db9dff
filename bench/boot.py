"""Boot-to-agent-ready: QEMU start to the first answered Health.Check.

    python -m bench.boot [--rounds 5]

Each round boots the built guest image with a plain ``qemu-system-x86_64``
command (TCG unless KVM is usable; the agent on virtio-serial) and records, on
the host's clock, when the guest init prints its first line (``init started``:
the kernel's share of the boot, the baseline) and when the agent first answers
``Health.Check``. Prints both medians, their ratio, the initrd size, and the
issue's target (agent ready in at most 4 s here).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import trio

from agent_proto import health_pb2
from guest.image import DEFAULT_IMAGE_DIR, INITRD_NAME, image_paths
from plugins.qemu.cmdline import (
    BASE_KERNEL_PARAMS,
    TCG_KERNEL_PARAMS,
    QemuSettings,
    balloon_option,
)
from shim.agent.transport import connect
from shim.host import HostFacts
from shim.hypervisor import SerialEndpoint
from ttrpc import Client, Code, RpcError

TARGET_SECONDS = 4.0
INIT_MARKER = b"husk-init: ["
TIMEOUT = 60.0


def qemu_argv(kernel: Path, initrd: Path, work: Path) -> list[str]:
    """The plain command line: the machine and devices a husk sandbox has, nothing else.

    The machine is the sandbox's (q35): on QEMU's default i440fx the guest spends
    ~0.4 s under TCG routing the virtio devices' legacy interrupts through ACPI,
    a cost no sandbox pays.
    """
    kvm = HostFacts.probe().kvm_usable
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]
    append = BASE_KERNEL_PARAMS if kvm else f"{BASE_KERNEL_PARAMS} {TCG_KERNEL_PARAMS}"
    return [
        "qemu-system-x86_64", "-machine", QemuSettings.machine_type, *accel,
        "-nodefaults", "-no-user-config", "-nographic",
        "-m", "512", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-serial", f"file:{work / 'console.log'}",
        "-device", "virtio-rng-pci",
        "-device", balloon_option(QemuSettings()),
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={work / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.channel.0",
    ]  # fmt: skip


async def _init_seen(console: Path, started: float) -> float:
    while True:
        try:
            if INIT_MARKER in console.read_bytes():
                return trio.current_time() - started
        except FileNotFoundError:
            pass
        await trio.sleep(0.005)


async def _agent_ready(sock: Path, started: float) -> float:
    stream = await connect(SerialEndpoint(sock), timeout=TIMEOUT)
    async with Client.open(stream) as client:
        health = client.stub(health_pb2.DESCRIPTOR.services_by_name["Health"])
        while True:
            try:
                await health.Check(health_pb2.CheckRequest(), timeout=0.25)
                return trio.current_time() - started
            except RpcError as e:
                # bytes sent before the guest opens its port are lost: ask again
                if e.code != Code.DEADLINE_EXCEEDED:
                    raise


async def one_boot(kernel: Path, initrd: Path) -> tuple[float, float]:
    """(seconds to the init's first line, seconds to the first Health answer)."""
    work = Path(tempfile.mkdtemp(prefix="husk-boot-"))
    init_time: float | None = None
    try:
        started = trio.current_time()
        process = await trio.lowlevel.open_process(qemu_argv(kernel, initrd, work))
        try:
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:

                    async def watch_init() -> None:
                        nonlocal init_time
                        init_time = await _init_seen(work / "console.log", started)

                    nursery.start_soon(watch_init)
                    ready = await _agent_ready(work / "agent.sock", started)
                    nursery.cancel_scope.cancel()
        finally:
            process.kill()
            await process.wait()
        if init_time is None:  # the agent answered before we saw the line
            init_time = await _init_seen(work / "console.log", started)
        return init_time, ready
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def main(rounds: int, image_dir: Path) -> None:
    kernel, initrd = image_paths(image_dir)
    init_times, ready_times = [], []
    for n in range(1, rounds + 1):
        init_t, ready_t = await one_boot(kernel, initrd)
        init_times.append(init_t)
        ready_times.append(ready_t)
        print(f"round {n}: init started {init_t:.2f} s  agent ready {ready_t:.2f} s")
    init_med, ready_med = statistics.median(init_times), statistics.median(ready_times)
    size = (image_dir / INITRD_NAME).stat().st_size / 2**20
    print(f"kernel: {kernel.name}, initrd {size:.1f} MiB")
    print(f"QEMU start -> init started (baseline) median: {init_med:.3f} s")
    print(f"QEMU start -> agent ready median: {ready_med:.3f} s (target <= {TARGET_SECONDS} s)")
    print(f"ratio agent ready / init started: {ready_med / init_med:.2f}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.image_dir)


if __name__ == "__main__":
    cli()
