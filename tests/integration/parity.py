"""The machinery of the runc-vs-husk parity suite (``test_runc_parity.py``).

A :class:`Pair` is the same container started twice on one containerd, once
under runc and once under husk; :meth:`Pair.run` runs one shell script in
both (``ctr task exec``) and returns both outputs. :class:`CriPair` is the same
for a CRI pod with one container, on the ``runc`` handler and a husk handler.
What the suite compares, and the differences it allows, live in the test
module.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from shim.cli import local_images
from tests.integration.containerd import CTR, Containerd
from tests.kubelet import cri_api_pb2 as cri
from tests.kubelet.client import CriClient
from tests.kubelet.pods import Pod, remove_container, remove_pod, start_container

IMAGE = local_images.BUSYBOX_REFERENCE
RUNC = "io.containerd.runc.v2"
HUSK = "io.containerd.husk.v2"


@dataclass(frozen=True)
class Seen:
    """What one script printed in the runc container and in the husk container."""

    runc: str
    husk: str


@dataclass
class Pair:
    """One container spec, started as ``<name>-runc`` and ``<name>-husk``."""

    ctd: Containerd
    name: str
    options: Sequence[str] = ()
    names: dict[str, str] = field(default_factory=dict)

    def start(self) -> list[subprocess.Popen[bytes]]:
        """``ctr run -d`` under both runtimes at once; the caller waits for both."""
        procs = []
        for runtime, suffix in ((RUNC, "runc"), (HUSK, "husk")):
            name = f"{self.name}-{suffix}"
            self.names[suffix] = name
            argv = [CTR, "--address", self.ctd.address, "run", "-d", "--runtime", runtime]
            argv += [*self.options, IMAGE, name, "sleep", "100000"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        return procs

    def run(self, script: str, *exec_options: str) -> Seen:
        """Run ``sh -c script`` in both containers; stdout and stderr together."""
        return Seen(
            self._exec(self.names["runc"], script, exec_options),
            self._exec(self.names["husk"], script, exec_options),
        )

    def _exec(self, name: str, script: str, options: Sequence[str]) -> str:
        exec_id = "x" + uuid.uuid4().hex[:8]
        proc = self.ctd.ctr(
            "task", "exec", "--exec-id", exec_id, *options, name, "sh", "-c", script + " 2>&1"
        )
        return proc.stdout.decode()

    def remove(self) -> None:
        """Kill and delete both containers."""
        for name in self.names.values():
            self.ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        for name in self.names.values():
            deadline = time.monotonic() + 30
            while self.ctd.ctr("task", "delete", name, check=False).returncode != 0:
                if time.monotonic() > deadline or not self._has_task(name):
                    break
                time.sleep(0.2)
            self.ctd.ctr("container", "rm", name, check=False)

    def _has_task(self, name: str) -> bool:
        listing = self.ctd.ctr("task", "ls", check=False).stdout.decode()
        return any(line.split()[:1] == [name] for line in listing.splitlines())


def start_pairs(pairs: Sequence[Pair]) -> None:
    """Start every pair at once (husk's VMs boot in parallel); fail naming the one that failed."""
    started = [(pair, proc) for pair in pairs for proc in pair.start()]
    failures = []
    for pair, proc in started:
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{pair.name}: {err.decode().strip() or out.decode().strip()}")
    if failures:
        raise AssertionError("ctr run failed: " + "; ".join(failures))


@dataclass
class CriContainers:
    """The same CRI container in the runc pod and in the husk pod."""

    client: CriClient
    ids: dict[str, str] = field(default_factory=dict)

    def run(self, script: str) -> Seen:
        """Run ``sh -c script`` in both (CRI ExecSync); stdout and stderr together."""
        out = {}
        for side, container_id in self.ids.items():
            result = self.client.exec_sync(container_id, ["sh", "-c", script + " 2>&1"], timeout=60)
            out[side] = result.stdout.decode()
        return Seen(out["runc"], out["husk"])

    def remove(self) -> None:
        """Stop and remove both."""
        for container_id in self.ids.values():
            remove_container(self.client, container_id)
        self.ids.clear()


@dataclass
class CriPair:
    """One pod per side (the ``runc`` handler and a husk handler), each with one container."""

    client: CriClient
    pods: dict[str, Pod] = field(default_factory=dict)
    main: CriContainers | None = None

    def start(
        self,
        handlers: dict[str, str],
        pod: cri.PodSandboxConfig,
        container: cri.ContainerConfig,
    ) -> None:
        """``handlers``: ``{"runc": <handler>, "husk": <handler>}``."""
        for side, handler in handlers.items():
            config = cri.PodSandboxConfig()
            config.CopyFrom(pod)
            config.metadata.uid = uuid.uuid4().hex
            self.pods[side] = Pod(self.client.run_pod_sandbox(config, handler), config)
        self.main = self.add(container)

    def add(self, container: cri.ContainerConfig) -> CriContainers:
        """Start one more container in both pods."""
        added = CriContainers(self.client)
        try:
            for side, pod in self.pods.items():
                added.ids[side] = start_container(self.client, pod, container)
        except BaseException:
            added.remove()
            raise
        return added

    def run(self, script: str) -> Seen:
        """Run ``sh -c script`` in both main containers."""
        assert self.main is not None
        return self.main.run(script)

    def update(self, resources: cri.LinuxContainerResources) -> None:
        """UpdateContainerResources on both main containers."""
        assert self.main is not None
        for container_id in self.main.ids.values():
            self.client.update_container_resources(container_id, resources)

    def remove(self) -> None:
        """Remove the containers and both pods."""
        if self.main is not None:
            self.main.remove()
        for pod in self.pods.values():
            remove_pod(self.client, pod)
