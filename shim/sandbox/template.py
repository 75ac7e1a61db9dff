"""The VM template (Kata's factory): one VM booted once, every sandbox started as its clone.

    <template_path>/               a small tmpfs husk mounts
        ram.json                   where the template's RAM is: a write-sealed memfd that
                                   a holder process keeps (see ``ram_holder``)
        state                      its device state (a few hundred KiB), saved without RAM
        template.json              the digest of what it was made from, when, its size
        vm/                        the template VM's state dir while it boots (then removed)

The template VM boots with its RAM in the holder's memfd (shared), reaches
its agent, and is saved with ``x-ignore-shared``: the state file holds no RAM.
Once the template VM has exited, the memfd is sealed against writes. A clone
maps it privately (copy-on-write) and loads ``state``; it answers its
first call in well under a second and shares every page no clone has written.
The template has the 9p device but never mounts it (QEMU cannot save a VM
with a mounted 9p share), so each clone gets its own share on its command
line; NICs are hot-plugged into clones as into any VM. A clone must stop
being a copy before anything reads the guest's randomness: the sandbox
reseeds its RNG and sets its clock first (see ``Sandbox``), and nothing in
the template reads ``boot_id`` (the kernel makes it on first read).

A template is valid while its digest matches: the kernel, initrd, root image and VMM
binary (size, mtime, inode), the hypervisor plugin's code and the VM's shape
in the config, and while its
RAM's holder runs and holds a sealed memfd of the RAM's size. A stale or
damaged template is made again on the next start; one that cannot be made or
cloned makes that sandbox boot cold, with one line in the log.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from common import mounts
from shim import registry
from shim.agent.client import wait_ready
from shim.config import Config
from shim.errors import FailedPreconditionError, HuskError
from shim.hypervisor import CLONE, GUEST_FILE_KEYS, TEMPLATE, Hypervisor, TemplateFiles, VmSpec
from shim.sandbox import cleanup, ram_holder
from shim.sandbox.boot_slots import BootSlots
from shim.sandbox.state import SandboxState, make_private_dir

log = logging.getLogger("husk.sandbox.template")

MANIFEST = "template.json"
RAM, STATE, VM_DIR = "ram.json", "state", "vm"
#: the tmpfs holds the state file and the manifest (the RAM is a memfd)
TMPFS_MIB = 16
#: keys of a hypervisor section that do not change the VM's shape
_NOT_SHAPE = {"boot_timeout", "stop_timeout", "enable_debug", "tcg_tb_size"}
_LOCK_POLL = 0.1

MakeHypervisor = Callable[[], Hypervisor]
MakeSpec = Callable[[SandboxState], VmSpec]


class TemplateError(FailedPreconditionError):
    """The template cannot be made or used; the sandbox boots cold."""


@dataclass(frozen=True)
class TemplateStatus:
    """What ``husk factory status`` says."""

    path: Path
    ready: bool
    detail: str
    memory_mib: int = 0
    created: float = 0.0


def _stat_of(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino]


@functools.cache
def plugin_code_digest(name: str) -> str:
    """The digest of the hypervisor plugin's source files (its package).

    A husk upgrade that changes what the VMM is started with (a device more, an
    option) cannot restore a template the old code saved: without this the
    template would stay "valid" and every clone of it fail. Read once per
    process: its code does not change under it.
    """
    module = sys.modules[type(registry.lookup(name)).__module__]
    package = Path(module.__file__ or "").parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode() + b"\0")
        digest.update(source.read_bytes())
    return digest.hexdigest()


def shape_digest(config: Config, spec: VmSpec) -> str:
    """What the template was made from: its files, the plugin's code, and the VM's
    shape in the config."""
    section = {k: v for k, v in config.hypervisor.items() if k not in _NOT_SHAPE}
    shape = {
        "hypervisor": config.runtime.hypervisor,
        "plugin_code": plugin_code_digest(config.runtime.hypervisor),
        "section": section,
        "files": [_stat_of(str(section[k])) for k in (*GUEST_FILE_KEYS, "path") if section.get(k)],
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "kernel_params": spec.kernel_params,
        "agent_transport": spec.agent_transport,
        "shared_fs": spec.shared_fs.kind if spec.shared_fs is not None else None,
        "debug_console": spec.debug_console,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()


class VmTemplate:
    """The template of one configuration, in ``[factory] template_path``."""

    def __init__(
        self,
        config: Config,
        make_hypervisor: MakeHypervisor,
        make_spec: MakeSpec,
        slots: BootSlots,
    ) -> None:
        self.config = config
        self.path = config.factory.template_path
        self._make_hypervisor = make_hypervisor
        self._make_spec = make_spec
        self._slots = slots

    @property
    def files(self) -> TemplateFiles:
        """The files a clone maps and loads (TemplateError: the RAM has no holder)."""
        record = ram_holder.Record.load(self.path / RAM)
        if record is None:
            raise TemplateError(f"the VM template in {self.path} has no RAM holder record")
        return TemplateFiles(memory=record.memory, state=self.path / STATE, role=CLONE)

    def _vm_state(self) -> SandboxState:
        return SandboxState(dir=self.path / VM_DIR, id="husk-template")

    def size(self) -> tuple[int, int]:
        """The template VM's vCPUs and MiB: what every clone starts with."""
        spec = self._make_spec(self._vm_state())
        return spec.vcpus, spec.memory_mib

    def digest(self) -> str:
        """The digest a template made now would have."""
        return shape_digest(self.config, self._make_spec(self._vm_state()))

    def _manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def problem(self) -> str | None:
        """Why the template cannot be cloned now (None: it can)."""
        manifest = self._manifest()
        if manifest is None:
            return f"no template in {self.path}"
        if manifest.get("digest") != self.digest():
            return (
                "the template is stale (kernel, initrd, root image, VMM or the VM's shape changed)"
            )
        return self._damage(manifest)

    def _damage(self, manifest: dict[str, Any]) -> str | None:
        """What is wrong with the files of a current template (None: nothing)."""
        size = int(manifest.get("memory_mib", 0)) << 20
        held = ram_holder.problem(ram_holder.Record.load(self.path / RAM), size)
        if held is not None:
            return held
        if not (self.path / STATE).is_file():
            return f"the template's state file {self.path / STATE} is gone"
        return None

    def status(self) -> TemplateStatus:
        """For ``husk factory status``."""
        manifest = self._manifest() or {}
        problem = self.problem()
        return TemplateStatus(
            path=self.path,
            ready=problem is None,
            detail=problem or "ready",
            memory_mib=int(manifest.get("memory_mib", 0)),
            created=float(manifest.get("created", 0.0)),
        )

    async def ensure(self) -> TemplateFiles:
        """The template's files, making the template first if it is missing or stale.

        A template that was made and has since been damaged (its files deleted, its
        RAM's holder killed) is not made again here: this start raises
        TemplateError and boots cold, and the damaged files are cleared so the
        next start makes a fresh template.
        """
        async with self._lock():
            damage = self._damaged()
            if damage is not None:
                await trio.to_thread.run_sync(self.destroy)
                raise TemplateError(f"the VM template in {self.path} is damaged: {damage}")
            problem = self.problem()
            if problem is not None:
                log.info("making the VM template in %s: %s", self.path, problem)
                await self._make()
        return self.files

    def _damaged(self) -> str | None:
        """Damage to a template that was made (its tmpfs is mounted), if any."""
        if not mounts.is_mount_point(self.path):
            return None  # never made (or destroyed): the first use makes it
        manifest = self._manifest()
        if manifest is None:
            return f"{self.path / MANIFEST} is gone"
        if manifest.get("digest") != self.digest():
            return None  # merely stale: made again
        return self._damage(manifest)

    async def _make(self) -> None:
        started = trio.current_time()
        await trio.to_thread.run_sync(self.destroy)
        await trio.to_thread.run_sync(self._mount)
        try:
            digest = self.digest()
            memory_mib = await self._boot_and_save()
            manifest = {"digest": digest, "created": time.time(), "memory_mib": memory_mib}
            tmp = self.path / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, self.path / MANIFEST)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.destroy)
            raise
        log.info("VM template ready in %s (%.2f s)", self.path, trio.current_time() - started)

    def _mount(self) -> None:
        make_private_dir(self.path)
        options = [f"size={TMPFS_MIB}m", "mode=0700", "nosuid", "nodev"]
        mounts.mount("tmpfs", self.path, "tmpfs", options)

    async def _boot_and_save(self) -> int:
        """Boot the template VM to its agent, save it, stop it; its RAM size in MiB."""
        state = self._vm_state()
        make_private_dir(state.dir)
        state.shared_dir.mkdir(mode=0o700)
        base = self._make_spec(state)
        hypervisor = self._make_hypervisor()
        if not hypervisor.capabilities().templates:
            raise TemplateError(f"hypervisor '{hypervisor.name}' cannot make VM templates")
        holder = await self._hold_ram(base.memory_mib << 20)
        memory, saved = holder.record.memory, self.path / STATE
        spec = dataclasses.replace(base, template=TemplateFiles(memory, saved, role=TEMPLATE))
        try:
            await self._boot_and_save_on(hypervisor, spec)
        except BaseException:
            holder.close()  # unsealed, it exits
            raise
        finally:
            with trio.CancelScope(shield=True):
                await hypervisor.destroy()
            shutil.rmtree(state.dir, ignore_errors=True)
        # the template VM has exited: no shared writable mapping of the RAM is left
        try:
            await trio.to_thread.run_sync(holder.seal)
        except ram_holder.HolderError as e:
            raise TemplateError(f"cannot make the VM template in {self.path}: {e}") from None
        return spec.memory_mib

    async def _boot_and_save_on(self, hypervisor: Hypervisor, spec: VmSpec) -> None:
        """Boot the template VM to its agent and save its device state."""
        section = self.config.hypervisor
        try:
            await hypervisor.prepare(spec)
            async with self._slots.slot("the VM template"):
                await hypervisor.start(float(section["boot_timeout"]))
                async with wait_ready(
                    hypervisor.agent_endpoint(),
                    self.config.agent.dial_timeout,
                    request_timeout=self.config.agent.request_timeout,
                ):
                    pass  # the agent answers: the guest is up; disconnect before saving
            await hypervisor.save_template()
        except HuskError as e:
            raise TemplateError(f"cannot make the VM template in {self.path}: {e}") from None

    async def _hold_ram(self, size: int) -> ram_holder.Holder:
        """A holder of the template's (unsealed) RAM, recorded in the template dir."""
        try:
            holder = await trio.to_thread.run_sync(ram_holder.start, self.path / RAM, size)
        except (OSError, ram_holder.HolderError) as e:
            raise TemplateError(f"cannot hold the VM template's RAM: {e}") from None
        try:
            (self.path / RAM).write_text(holder.record.dump())
        except OSError as e:
            holder.close()
            raise TemplateError(f"cannot record the VM template's RAM holder: {e}") from None
        return holder

    def destroy(self) -> list[str]:
        """Stop whatever still runs from the template, unmount it, remove it; problems."""
        problems: list[str] = []
        if self.path.exists():
            for pid in cleanup.kill_and_wait(cleanup.processes_naming(self.path / VM_DIR)):
                problems.append(f"template VM process {pid} survived SIGKILL")
        # the RAM's holder (running clones keep their own mappings of the memfd)
        for pid in cleanup.kill_and_wait(ram_holder.holders(self.path / RAM)):
            problems.append(f"template RAM holder {pid} survived SIGKILL")
        for point in mounts.mounts_under(self.path):
            try:
                mounts.unmount(point)
            except mounts.MountError as e:
                problems.append(str(e))
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            problems.append(f"cannot remove {self.path}")
        return problems

    class _Lock:
        def __init__(self, path: Path) -> None:
            self.path = path
            self.fd = -1

        async def __aenter__(self) -> None:
            make_private_dir(self.path.parent)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                await trio.sleep(_LOCK_POLL)

        async def __aexit__(self, *exc: object) -> None:
            os.close(self.fd)

    def _lock(self) -> VmTemplate._Lock:
        """Held while the template is checked or made: one maker at a time, host-wide.

        The lock file sits beside the template dir, not in it (the dir is a tmpfs
        that is unmounted and made again).
        """
        return VmTemplate._Lock(self.path.with_name(self.path.name + ".lock"))
