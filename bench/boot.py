"""Boot-to-agent-ready: QEMU start to the first answered Health.Check.

    python -m bench.boot [--rounds 5]

Each round boots the built guest image twice, alternating, with a plain
``qemu-system-x86_64`` command (TCG unless KVM is usable; the agent on
virtio-serial): as a sandbox does, from the shared root image (``root.img``
behind virtio-pmem, mounted by ``root-initrd.img``), and from the whole guest
as an initramfs (``initrd.img``). It records, on the host's clock, when the
guest init prints its first line (``init started``: the kernel's share of the
boot, the baseline) and when the agent first answers ``Health.Check``. Prints
both medians of each, the ratio for the root image boot (the sandbox's), and
root image against initramfs.
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
from guest.image.manifest import LOADER_NAME, ROOT_IMAGE_NAME
from plugins.qemu.cmdline import (
    BASE_KERNEL_PARAMS,
    TCG_KERNEL_PARAMS,
    QemuSettings,
    balloon_option,
    memory_option,
    root_image_args,
)
from shim.agent.transport import connect
from shim.host import HostFacts
from shim.hypervisor import SerialEndpoint, VmSpec
from ttrpc import Client, Code, RpcError

TARGET_SECONDS = 4.0
#: the memory of a sandbox VM (``-m``), for the plain command line
_SPEC_512 = VmSpec("bench", Path("/nonexistent"), 1, 512, Path("vmlinux"), None)
INIT_MARKER = b"husk-init: ["
TIMEOUT = 60.0


def qemu_argv(kernel: Path, initrd: Path, work: Path, image: Path | None = None) -> list[str]:
    """The plain command line: the machine and devices a husk sandbox has, nothing else
    (``image``: the root image's virtio-pmem device, as the QEMU plugin adds it).

    The machine is the sandbox's (q35): on QEMU's default i440fx the guest spends
    ~0.4 s under TCG routing the virtio devices' legacy interrupts through ACPI,
    a cost no sandbox pays.
    """
    kvm = HostFacts.probe().kvm_usable
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]
    append = BASE_KERNEL_PARAMS if kvm else f"{BASE_KERNEL_PARAMS} {TCG_KERNEL_PARAMS}"
    settings = QemuSettings(image=str(image) if image else "")
    memory = memory_option(_SPEC_512, settings)
    return [
        "qemu-system-x86_64", "-machine", QemuSettings.machine_type, *accel,
        "-nodefaults", "-no-user-config", "-nographic",
        "-m", memory, "-no-reboot", *root_image_args(settings),
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


async def one_boot(kernel: Path, initrd: Path, image: Path | None) -> tuple[float, float]:
    """(seconds to the init's first line, seconds to the first Health answer)."""
    work = Path(tempfile.mkdtemp(prefix="husk-boot-"))
    init_time: float | None = None
    try:
        started = trio.current_time()
        process = await trio.lowlevel.open_process(qemu_argv(kernel, initrd, work, image))
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
    boots = {
        "root image": (image_dir / LOADER_NAME, image_dir / ROOT_IMAGE_NAME),
        "initramfs": (initrd, None),
    }
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in boots}
    for n in range(1, rounds + 1):
        for name, (boot_initrd, image) in boots.items():
            init_t, ready_t = await one_boot(kernel, boot_initrd, image)
            times[name][0].append(init_t)
            times[name][1].append(ready_t)
            print(f"round {n} {name}: init started {init_t:.2f} s  agent ready {ready_t:.2f} s")
    print(
        f"kernel: {kernel.name}, root image {_mib(image_dir / ROOT_IMAGE_NAME)} + loader "
        f"{_mib(image_dir / LOADER_NAME)}, initramfs {_mib(image_dir / INITRD_NAME)}"
    )
    ready: dict[str, float] = {}
    for name, (init_times, ready_times) in times.items():
        init_med, ready[name] = statistics.median(init_times), statistics.median(ready_times)
        print(f"{name}: QEMU start -> init started (baseline) median: {init_med:.3f} s")
        print(f"{name}: QEMU start -> agent ready median: {ready[name]:.3f} s")
        if name == "root image":
            print(f"{name}: target agent ready <= {TARGET_SECONDS} s")
            print(f"ratio agent ready / init started: {ready[name] / init_med:.2f}")
    print(f"agent ready, root image / initramfs: {ready['root image'] / ready['initramfs']:.2f}")


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.image_dir)


if __name__ == "__main__":
    cli()
