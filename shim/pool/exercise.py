"""A pool VM's warm-up: one throw-away container through the paths a pod takes.

Under TCG, QEMU translates guest code the first time it runs and keeps the
translation in its own process, so the first container in a fresh VM pays for
translating the agent's whole create/start/exec/wait/remove path (about a
second here). A pool VM runs one container through that path before it is
offered: ``CreateSandbox`` with the share, ``CreateContainer`` on a rootfs
shared over 9p as a pod's is, ``StartContainer``, ``ExecProcess`` and its
``WaitProcess``, a kill of the init process and its wait, ``RemoveContainer``;
then ``ResetSandbox`` undoes the sandbox without powering off. The rootfs
holds one static busybox (copied from the guest image's directory), it is
removed from the host afterwards, and nothing of it is left in the guest.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from typing import Any

import trio

from agent_proto import agent_pb2, oci_pb2
from shim.agent.client import AgentClient
from shim.errors import HuskError
from shim.resources import DIR, Resource
from shim.sandbox import oci, rootfs
from shim.sandbox.devices import DeviceManager
from shim.sandbox.state import SandboxState

log = logging.getLogger("husk.pool.exercise")

#: the static busybox ``husk image build`` writes beside the kernel (the image's
#: ``BUSYBOX_NAME``; named here so a shim does not import the image builder)
BUSYBOX_NAME = "busybox"
#: the throw-away container's id
CONTAINER_ID = "husk-pool-exercise"
EXEC_ID = "exercise"
#: its bundle, in the pool VM's state dir
BUNDLE = "exercise"
#: what the exercise may take before the VM is given up
TIMEOUT = 120.0

_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec"]},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "ro"]},
]


def container_spec(rootfs_path: str) -> dict[str, Any]:
    """The OCI spec of the throw-away container (its init sleeps until killed)."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "sleep", "600"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs_path, "readonly": True},
        "mounts": _MOUNTS,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
        },
    }


def make_bundle(state: SandboxState, busybox: Path) -> Path:
    """``<state>/exercise/rootfs/bin/busybox``: the throw-away container's whole rootfs."""
    bundle = state.dir / BUNDLE
    state.record(Resource(DIR, path=str(bundle)))
    target = bundle / "rootfs" / "bin"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, target / "busybox")
    return bundle


async def run(
    agent: AgentClient,
    state: SandboxState,
    devices: DeviceManager,
    share: agent_pb2.Storage | None,
    busybox: Path,
) -> None:
    """Run the throw-away container, then reset the guest's sandbox."""
    with trio.fail_after(TIMEOUT):
        bundle = await trio.to_thread.run_sync(make_bundle, state, busybox)
        spec = container_spec("rootfs")
        await agent.create_sandbox(
            agent_pb2.CreateSandboxRequest(
                storages=[share] if share is not None else [], sandbox_id=state.id
            )
        )
        shared = await rootfs.attach(CONTAINER_ID, str(bundle), spec, [], state, devices)
        try:
            oci_spec = oci.spec_from_json(spec)
            oci_spec.Root.Path = shared.guest_path
            await agent.create_container(
                agent_pb2.CreateContainerRequest(
                    container_id=CONTAINER_ID, storages=shared.storages, OCI=oci_spec
                )
            )
            await agent.start_container(CONTAINER_ID)
            await agent.exec_process(
                agent_pb2.ExecProcessRequest(
                    container_id=CONTAINER_ID,
                    exec_id=EXEC_ID,
                    process=oci_pb2.Process(
                        Args=["/bin/busybox", "true"], Env=["PATH=/bin"], Cwd="/"
                    ),
                )
            )
            status = await agent.wait_process(CONTAINER_ID, EXEC_ID)
            if status != 0:
                raise HuskError(f"VM pool: the exercise's exec exited with status {status}")
            await agent.signal_process(CONTAINER_ID, "", signal.SIGKILL)
            await agent.wait_process(CONTAINER_ID, "")
            await agent.remove_container(CONTAINER_ID)
        finally:
            with trio.CancelScope(shield=True):
                await rootfs.detach(CONTAINER_ID, shared, state, devices)
        await agent.reset_sandbox()
        await trio.to_thread.run_sync(shutil.rmtree, bundle)
        state.forget(Resource(DIR, path=str(bundle)))
