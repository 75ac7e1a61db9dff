"""A real registry on loopback (Debian's ``docker-registry``) and a client that pushes to it.

``LoopbackRegistry(binary, base)`` runs ``docker-registry serve`` with its
storage, config and log under ``base``, on ``127.0.0.1`` and a free port, plain
HTTP, deletes enabled; ``stop()`` ends it. ``push(registry, name, tags, image)``
uploads a ``local_images.Composed`` image through the Docker Registry HTTP API
V2 (blob upload by monolithic PUT, then the manifest once per tag), as any
client does; the registry checks every digest. Nothing outside ``base`` is
written.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from shim.cli.local_images import MANIFEST_TYPE, Composed


class RegistryError(RuntimeError):
    """The registry refused a request or did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LoopbackRegistry:
    """One ``docker-registry`` on 127.0.0.1, its state under ``base``."""

    def __init__(self, binary: Path, base: Path, timeout: float = 30.0) -> None:
        self.base = base
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        storage = base / "storage"
        storage.mkdir(parents=True)
        config = base / "config.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }))  # fmt: skip
        self._log = open(base / "registry.log", "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [str(binary), "serve", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RegistryError(f"docker-registry exited: {self.log_text()[-2000:]}")
            with contextlib.suppress(OSError):
                status, _, _ = self.request("GET", "/v2/")
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise RegistryError(f"docker-registry did not answer on {self.host}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return (self.base / "registry.log").read_text(errors="replace")

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request: status, headers (lower-case names), body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _expect(status: int, wanted: int, what: str, body: bytes) -> None:
    if status != wanted:
        raise RegistryError(f"{what}: HTTP {status}: {body[:300]!r}")


def push(registry: LoopbackRegistry, name: str, tags: Sequence[str], image: Composed) -> str:
    """Upload ``image`` as ``name:tag`` for each tag; returns the manifest digest."""
    for digest, data in image.blobs.items():
        status, _, _ = registry.request("HEAD", f"/v2/{name}/blobs/{digest}")
        if status == 200:
            continue
        status, headers, body = registry.request("POST", f"/v2/{name}/blobs/uploads/")
        _expect(status, 202, f"upload of {name} {digest}", body)
        location = urlsplit(headers["location"])
        query = f"{location.query}&" if location.query else ""
        status, _, body = registry.request(
            "PUT", f"{location.path}?{query}digest={digest}", data,
            {"Content-Type": "application/octet-stream"},
        )  # fmt: skip
        _expect(status, 201, f"upload of {name} {digest}", body)
    for tag in tags:
        status, _, body = registry.request(
            "PUT", f"/v2/{name}/manifests/{tag}", image.manifest, {"Content-Type": MANIFEST_TYPE}
        )
        _expect(status, 201, f"manifest {name}:{tag}", body)
    return image.digest
