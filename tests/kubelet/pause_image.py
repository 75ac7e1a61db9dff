"""A local pause image for CRI pods, made from Debian's busybox-static.

The CRI plugin starts every pod with its ``sandbox_image``, and there is no
registry to pull ``registry.k8s.io/pause`` from. ``build(path)`` writes an OCI
image-layout tarball for ``ctr image import``: the layer of
``shim.busybox_image`` (``/bin/busybox`` and its applets) with an image config
whose entrypoint plays the pause process: it sleeps until SIGTERM or SIGINT
and then exits 0, like the real pause (containerd 1.6 stops the sandbox with
SIGKILL anyway).

The tarball comes from ``busybox_image.build`` and only its config is swapped
(so the config and manifest digests, and the index, are rewritten); once
``busybox_image.build`` takes an image config, this becomes one call.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from shim import busybox_image

REFERENCE = "registry.k8s.io/pause:husk"
#: exits 0 on TERM/INT (killing its sleep, so nothing outlives it when the pod
#: shares the host's PID namespace); PID 1 ignores signals it has no handler for
ENTRYPOINT = [
    "/bin/sh",
    "-c",
    "trap 'kill $child 2>/dev/null; exit 0' TERM INT; "
    "while :; do sleep 2147483647 & child=$!; wait $child; done",
]


def _read(tar_path: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[member.name] = extracted.read()
    return files


def _put_blob(files: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    return digest


def _blob(files: dict[str, bytes], digest: str) -> Any:
    return json.loads(files["blobs/sha256/" + digest.split(":", 1)[1]])


def _swap_config(files: dict[str, bytes]) -> None:
    index = json.loads(files["index.json"])
    entry = index["manifests"][0]
    manifest = _blob(files, entry["digest"])
    config = _blob(files, manifest["config"]["digest"])
    for old in (entry["digest"], manifest["config"]["digest"]):
        del files["blobs/sha256/" + old.split(":", 1)[1]]
    config["config"] = {"Entrypoint": ENTRYPOINT, "Env": ["PATH=/bin:/usr/bin"], "WorkingDir": "/"}
    config["history"].append({"created_by": "husk pause_image: sleep until TERM"})
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest["config"].update(digest=_put_blob(files, config_bytes), size=len(config_bytes))
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    entry.update(digest=_put_blob(files, manifest_bytes), size=len(manifest_bytes))
    files["index.json"] = json.dumps(index, sort_keys=True).encode()


def build(output: Path, reference: str = REFERENCE, busybox: Path = busybox_image.BUSYBOX) -> Path:
    """Write the pause image tarball, named ``reference``, to ``output``; returns it."""
    with tempfile.TemporaryDirectory(prefix="pause-image-") as tmp:
        files = _read(busybox_image.build(Path(tmp) / "busybox.tar", reference, busybox))
    _swap_config(files)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(output, "w") as tar:
        for name, data in sorted(files.items(), key=lambda item: item[0] != "oci-layout"):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return output
