"""OCI images made locally from Debian's ``busybox-static``: no registry needed.

``build_busybox(path)`` and ``build_pause(path)`` write OCI image-layout
tarballs (``oci-layout``, ``index.json``, ``blobs/sha256/...``) with one layer:
``/bin/busybox``, a symlink per applet, ``/etc/passwd``/``group`` and the usual
empty directories; ``ctr image import`` takes them. The busybox image is for
the demo and the tests; the pause image is the CRI plugin's ``sandbox_image``
(the process every pod starts with), whose entrypoint sleeps until SIGTERM or
SIGINT and exits 0, like Kubernetes' own pause.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
BUSYBOX_REFERENCE = "docker.io/library/busybox:husk"
PAUSE_REFERENCE = "registry.k8s.io/pause:husk"
BUSYBOX_CONFIG = {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["sh"], "WorkingDir": "/"}
#: exits 0 on TERM/INT (killing its sleep, so nothing outlives it when the pod
#: shares the host's PID namespace); PID 1 ignores signals it has no handler for
PAUSE_CONFIG = {
    "Env": ["PATH=/bin:/usr/bin"],
    "WorkingDir": "/",
    "Entrypoint": [
        "/bin/sh",
        "-c",
        "trap 'kill $child 2>/dev/null; exit 0' TERM INT; "
        "while :; do sleep 2147483647 & child=$!; wait $child; done",
    ],
}
_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var", "usr", "usr/bin")
_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "busybox\n",
}


def applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applets this busybox binary provides."""
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def _layer(busybox: Path, hard_links: bool = False) -> bytes:
    raw = io.BytesIO()
    mtime = int(busybox.stat().st_mtime)
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in _DIRS:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            if d == "tmp":
                info.mode = 0o1777
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, mtime
        tar.addfile(info, io.BytesIO(data))
        for name in applets(busybox):
            if name == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname, link.mode, link.mtime = (
                (tarfile.LNKTYPE, "bin/busybox", 0o755, mtime)
                if hard_links
                else (tarfile.SYMTYPE, "busybox", 0o777, mtime)
            )
            tar.addfile(link)
        for path, text in _ETC.items():
            body = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(body), 0o644, mtime
            tar.addfile(info, io.BytesIO(body))
    return raw.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def build_busybox(output: Path, reference: str = BUSYBOX_REFERENCE) -> Path:
    """The busybox image (``sh`` by default) as a tarball at ``output``; returns it."""
    return build(output, reference, BUSYBOX_CONFIG, "busybox from Debian busybox-static")


def build_pause(output: Path, reference: str = PAUSE_REFERENCE) -> Path:
    """The pause image (sleeps until TERM) as a tarball at ``output``; returns it."""
    return build(output, reference, PAUSE_CONFIG, "pause: sleep until TERM")


def busybox_layer(busybox: Path = BUSYBOX, hard_links: bool = False) -> bytes:
    """The uncompressed busybox layer every local image starts from (applets
    as symlinks to ``busybox``, or as hard links as Docker's busybox has them)."""
    return _layer(busybox, hard_links)


@dataclass(frozen=True)
class Composed:
    """An image's manifest and every blob it names (config and layers), by digest."""

    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        """The manifest's digest: the image's ``repo digest``."""
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def compose(image_config: dict[str, Any], history: str, layers: Sequence[bytes]) -> Composed:
    """An OCI image of ``layers`` (uncompressed tars, lowest first) and ``image_config``."""
    blobs: dict[str, bytes] = {}
    descriptors = []
    for layer in layers:
        compressed = gzip.compress(layer, mtime=0)
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _blob(blobs, compressed),
                "size": len(compressed),
            }
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers],
        },
        "history": [{"created_by": f"husk: {history}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = _blob(blobs, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": descriptors,
    }
    return Composed(json.dumps(manifest, sort_keys=True).encode(), blobs)


def build(
    output: Path,
    reference: str,
    image_config: dict[str, Any],
    history: str,
    busybox: Path = BUSYBOX,
) -> Path:
    """Write an image of the busybox layer with ``image_config`` to ``output``; returns it."""
    image = compose(image_config, history, [_layer(busybox)])
    blobs = dict(image.blobs)
    manifest_digest = _blob(blobs, image.manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_digest,
                "size": len(image.manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": reference,
                    "org.opencontainers.image.ref.name": reference.rpartition(":")[2],
                },
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    output.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(output, "w") as tar:
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return output
