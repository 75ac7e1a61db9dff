"""A real containerd with its CRI plugin, CNI and a local pause image, all on a temp dir.

The sibling of ``tests.integration.containerd.Containerd`` (which disables
CRI) for tests that drive containerd the way the kubelet does.
``CriContainerd(base, runtimes=..., binaries=...)`` runs one release of the
matrix (the system's 1.6 by default) with a ``containerd.toml`` of the version
that release reads natively: version 2 for 1.x (everything under
``plugins."io.containerd.grpc.v1.cri"``), version 3 for 2.x (runtimes and CNI
under ``plugins."io.containerd.cri.v1.runtime"``, the sandbox image under
``plugins."io.containerd.cri.v1.images".pinned_images``, the streaming server
under ``plugins."io.containerd.grpc.v1.cri"``). Its root, state, socket, CNI
conf dir, IPAM store and pod netns mounts all live under ``base``; a CNI
bridge of its own (unique name and /24); the
``runc`` handler plus any handlers the caller adds (``husk_handler(...)``);
and imports the pause image and the busybox image into the ``k8s.io``
namespace. ``mirrors`` (upstream registry -> mirror URL) become its registry
host configuration (``config_path``, ``<upstream>/hosts.toml``), the way an
air-gapped cluster pulls through a local registry. ``stop()`` removes the
pods left, stops containerd and its shims, unmounts, deletes the bridge and
what CNI wrote outside ``base``, and restores ``net.ipv4.ip_forward`` (the
bridge plugin turns it on for a gateway).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim.cli import local_images
from tests.integration.containerd import CTR_ENV, SYSTEM, _mounts_under, disabled_plugins, shim_dir
from tests.integration.containerd_versions import ContainerdBinaries
from tests.kubelet.client import CriClient, GRPCError, TasksClient

CRI = "io.containerd.grpc.v1.cri"
#: containerd 2's CRI services (config version 3)
CRI_RUNTIME = "io.containerd.cri.v1.runtime"
CRI_IMAGES = "io.containerd.cri.v1.images"
K8S_NAMESPACE = "k8s.io"
CNI_BIN_DIR = "/usr/lib/cni"
#: host-local and libcni keep results here whatever the conf says (go-cni in
#: containerd 1.6 has no cache-dir option); emptied of our entries on stop
CNI_CACHE_DIR = Path("/var/lib/cni")
BUSYBOX_IMAGE = local_images.BUSYBOX_REFERENCE
PAUSE_IMAGE = local_images.PAUSE_REFERENCE
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")


@dataclass(frozen=True)
class RuntimeHandler:
    """One ``[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<name>]`` entry."""

    runtime_type: str
    options: Mapping[str, str | int | bool] = field(default_factory=dict)
    pod_annotations: Sequence[str] = ()
    container_annotations: Sequence[str] = ()
    #: containerd 2's sandboxer ("shim": the shim starts the pod's sandbox, no pause container)
    sandboxer: str = ""


RUNC = RuntimeHandler("io.containerd.runc.v2")


def husk_handler(config_path: Path | str, sandboxer: str = "") -> RuntimeHandler:
    """A handler for husk, as Kata's is configured: its config file in ``options``
    (``sandboxer = "shim"``: containerd 2's ``husk-vm``, no pause container)."""
    return RuntimeHandler(
        "io.containerd.husk.v2",
        options={"ConfigPath": str(config_path)},
        pod_annotations=("io.husk.*",),
        sandboxer=sandboxer,
    )


def _toml(value: str | int | bool | Sequence[str]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return "[" + ", ".join(json.dumps(v) for v in value) + "]"


def _table(name: str, keys: Mapping[str, str | int | bool | Sequence[str]]) -> str:
    body = "".join(f"  {key} = {_toml(value)}\n" for key, value in keys.items())
    return f"[{name}]\n{body}"


@dataclass(frozen=True)
class CniNetwork:
    """The bridge network of one CriContainerd: its own bridge and /24."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's address, the pods' default gateway."""
        return self.subnet.network_address + 1

    @classmethod
    def claim(cls) -> CniNetwork:
        """Pick a free /24 and create its bridge, which reserves it atomically."""
        used = subprocess.run(
            ["ip", "-4", "-o", "route", "show"], capture_output=True, text=True, check=True
        ).stdout
        candidates = list(enumerate(_SUBNETS.subnets(new_prefix=24)))
        random.shuffle(candidates)
        for index, subnet in candidates:
            if str(subnet) in used:
                continue
            bridge = f"hcri{index}"
            made = subprocess.run(
                ["ip", "link", "add", bridge, "type", "bridge"], capture_output=True, check=False
            )
            if made.returncode == 0:
                return cls(f"husk-cri-{index}", bridge, subnet)
        raise RuntimeError(f"no free /24 in {_SUBNETS} for a CNI bridge")

    def conflist(self, ipam_dir: Path) -> dict[str, object]:
        """The CNI network list: bridge (host-local IPAM under ``ipam_dir``) + portmap."""
        ipam = {
            "type": "host-local",
            "ranges": [[{"subnet": str(self.subnet), "gateway": str(self.gateway)}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(ipam_dir),
        }
        bridge = {
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": False,
            "ipam": ipam,
        }
        portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
        return {"cniVersion": "1.0.0", "name": self.name, "plugins": [bridge, portmap]}

    def release(self) -> None:
        """Delete the bridge and libcni's cached results for this network."""
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        results = CNI_CACHE_DIR / "results"
        for cached in results.glob(f"{self.name}-*"):
            cached.unlink(missing_ok=True)


class CriContainerd:
    """One containerd with CRI on its own root, state, socket and CNI bridge."""

    def __init__(
        self,
        base: Path,
        runtimes: Mapping[str, RuntimeHandler] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        binaries: ContainerdBinaries = SYSTEM,
        mirrors: Mapping[str, str] | None = None,
    ) -> None:
        self.base = base
        self.mirrors = dict(mirrors or {})
        self.binaries = binaries
        self.address = str(base / "c.sock")
        self.root, self.state = base / "root", base / "state"
        self.cri_state = self.state / CRI
        self.netns_dir = self.cri_state / "netns"
        self.runtimes = {"runc": RUNC, **(runtimes or {})}
        self._host_before = _HostTraces.record()
        self.network = CniNetwork.claim()
        self.proc: subprocess.Popen[bytes] | None = None
        self.cri: CriClient | None = None
        try:
            self._start(env or {}, timeout)
        except BaseException:
            self.stop()
            raise

    # ---- start ----

    def _start(self, env: Mapping[str, str], timeout: float) -> None:
        bin_dir = shim_dir(self.base, self.binaries)
        conf_dir = self.base / "cni"
        conf_dir.mkdir()
        conflist = self.network.conflist(self.base / "cni-ipam")
        (conf_dir / "10-husk.conflist").write_text(json.dumps(conflist, indent=2))
        self._write_hosts()
        config = self.base / "containerd.toml"
        config.write_text(self._config(conf_dir))
        self.env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        with open(self.base / "containerd.log", "wb") as log:
            self.proc = subprocess.Popen(
                [str(self.binaries.containerd), "--config", str(config), "--log-level", "debug"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self._wait_cri(timeout)
        self._import_images(timeout)

    @property
    def registry_config_path(self) -> Path:
        """containerd's registry host configuration (``<host>/hosts.toml``)."""
        return self.base / "certs.d"

    def _write_hosts(self) -> None:
        # an air-gapped cluster's mirrors: each upstream registry is served by
        # a local one (plain HTTP on loopback), for pull and resolve only
        for upstream, mirror in self.mirrors.items():
            directory = self.registry_config_path / upstream
            directory.mkdir(parents=True)
            (directory / "hosts.toml").write_text(
                f"server = {_toml('https://' + upstream)}\n\n[host.{_toml(mirror)}]\n"
                '  capabilities = ["pull", "resolve"]\n'
            )

    def _config(self, cni_conf_dir: Path) -> str:
        head = (
            f"version = {self.binaries.config_version}\n"
            f"root = {_toml(str(self.root))}\nstate = {_toml(str(self.state))}\n"
            f"disabled_plugins = {_toml(disabled_plugins(self.binaries, cri=True))}\n"
        )
        parts = [
            head,
            _table("grpc", {"address": self.address}),
            _table('plugins."io.containerd.internal.v1.opt"', {"path": str(self.base / "opt")}),
        ]
        # root here lacks CAP_SYS_RESOURCE: never lower a score below ours
        runtime_keys: dict[str, str | int | bool | Sequence[str]] = {
            "restrict_oom_score_adj": True,
            "disable_apparmor": True,
            "netns_mounts_under_state_dir": True,
        }
        streaming = {"stream_server_address": "127.0.0.1", "stream_server_port": "0"}
        cni: dict[str, str | int | bool | Sequence[str]] = {
            "conf_dir": str(cni_conf_dir),
            "max_conf_num": 1,
        }
        registry = {"config_path": str(self.registry_config_path)}
        if self.binaries.config_version >= 3:
            runtime = f'plugins."{CRI_RUNTIME}"'
            parts += [
                _table(f'plugins."{CRI}"', streaming),
                _table(f'plugins."{CRI_IMAGES}"', {"snapshotter": "overlayfs"}),
                _table(f'plugins."{CRI_IMAGES}".pinned_images', {"sandbox": PAUSE_IMAGE}),
                _table(f'plugins."{CRI_IMAGES}".registry', registry),
                _table(runtime, runtime_keys),
                _table(f"{runtime}.cni", {"bin_dirs": [CNI_BIN_DIR], **cni}),
            ]
        else:
            runtime = f'plugins."{CRI}"'
            parts += [
                _table(runtime, {"sandbox_image": PAUSE_IMAGE, **runtime_keys, **streaming}),
                _table(f"{runtime}.cni", {"bin_dir": CNI_BIN_DIR, **cni}),
                _table(f"{runtime}.registry", registry),
            ]
        containerd = {"default_runtime_name": "runc"}
        if self.binaries.config_version < 3:
            containerd["snapshotter"] = "overlayfs"
        parts.append(_table(f"{runtime}.containerd", containerd))
        for name, handler in self.runtimes.items():
            table = f"{runtime}.containerd.runtimes.{name}"
            keys: dict[str, str | int | bool | Sequence[str]] = {
                "runtime_type": handler.runtime_type
            }
            if handler.pod_annotations:
                keys["pod_annotations"] = list(handler.pod_annotations)
            if handler.container_annotations:
                keys["container_annotations"] = list(handler.container_annotations)
            if handler.sandboxer:
                keys["sandboxer"] = handler.sandboxer
            parts.append(_table(table, keys))
            if handler.options:
                parts.append(_table(f"{table}.options", handler.options))
        return "\n".join(parts)

    def _wait_cri(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.address):
            self._check_alive(deadline)
            time.sleep(0.1)
        self.cri = CriClient(self.address)
        while True:
            try:
                self.cri.version()
                return
            except (GRPCError, ConnectionError, OSError):
                self._check_alive(deadline)
                time.sleep(0.2)

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"containerd exited: {self.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"containerd's CRI did not answer: {self.log_text()[-3000:]}")

    def _import_images(self, timeout: float) -> None:
        images = self.base / "images"
        for tarball in (
            local_images.build_pause(images / "pause.tar"),
            local_images.build_busybox(images / "busybox.tar"),
        ):
            self.ctr("image", "import", str(tarball), timeout=timeout)
        # the CRI plugin learns of images through containerd's events
        assert self.cri is not None
        deadline = time.monotonic() + timeout
        while not all(self.cri.image_status(ref) for ref in (PAUSE_IMAGE, BUSYBOX_IMAGE)):
            if time.monotonic() > deadline:
                raise RuntimeError("the CRI plugin does not see the imported images")
            time.sleep(0.2)

    # ---- use ----

    def ctr(
        self, *args: str, namespace: str = K8S_NAMESPACE, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr --address <ours> -n <namespace> <args>``; stdout and stderr as bytes."""
        proc = subprocess.run(
            [str(self.binaries.ctr), "--address", self.address, "-n", namespace, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=CTR_ENV,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}"
            )
        return proc

    def tasks(self, namespace: str = K8S_NAMESPACE) -> TasksClient:
        """A Tasks client on this containerd (the caller closes it)."""
        return TasksClient(self.address, namespace)

    def log_text(self) -> str:
        """containerd's log so far (shim logs included)."""
        return (self.base / "containerd.log").read_text(errors="replace")

    # ---- stop ----

    def remove_all_pods(self) -> None:
        """Stop and remove every pod sandbox, as the kubelet would when draining."""
        if self.cri is None:
            return
        for pod in self.cri.list_pod_sandbox():
            with contextlib.suppress(GRPCError):
                self.cri.stop_pod_sandbox(pod.id)
                self.cri.remove_pod_sandbox(pod.id)

    def stop(self) -> None:
        """Remove pods, stop containerd and its shims, undo host changes, delete ``base``."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.remove_all_pods()
        if self.cri is not None:
            self.cri.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_shims(self.address)
        for point in _mounts_under(self.base):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        self.network.release()
        self._host_before.restore()
        shutil.rmtree(self.base, ignore_errors=True)


def _kill_shims(address: str) -> None:
    """SIGKILL the shims this containerd started (they outlive it by design)."""
    needle = address.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-address" in argv and needle in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@dataclass
class _HostTraces:
    """Host state the CRI path changes outside ``base``, as found before it ran."""

    ip_forward: str
    missing_dirs: list[Path]

    @classmethod
    def record(cls) -> _HostTraces:
        cgroups = [d / K8S_NAMESPACE for d in Path("/sys/fs/cgroup").iterdir() if d.is_dir()]
        cni_dirs = [CNI_CACHE_DIR / "results", CNI_CACHE_DIR]
        return cls(
            ip_forward=_IP_FORWARD.read_text().strip(),
            missing_dirs=[d for d in [*cgroups, *cni_dirs] if not d.exists()],
        )

    def restore(self) -> None:
        """Put ip_forward back; remove the (empty) dirs that did not exist before."""
        if _IP_FORWARD.read_text().strip() != self.ip_forward:
            _IP_FORWARD.write_text(self.ip_forward)
        for directory in self.missing_dirs:
            # only empty ones: another containerd may still use it
            with contextlib.suppress(OSError):
                directory.rmdir()
