"""The images critest pulls, made here from Debian packages and pushed to a loopback registry.

critest names its images under ``registry.k8s.io/e2e-test-images/`` and
``gcr.io/k8s-staging-cri-tools/``; with ``--registry-prefix <host>`` it pulls
``<host>/<path>`` instead, so each image below is pushed under the path critest
asks for. Every image starts from a busybox layer (``shim.cli.local_images``, from
Debian's dynamic ``busybox`` package, whose shell execs ``ls`` as Docker's
busybox does, its applets hard links as there) and a layer with busybox's
libraries, ``/etc/passwd`` and ``group`` (root, www-data, users, nobody),
and the host's ``pgrep`` and ``ipcs`` (specs run them; busybox lacks them),
each with its libraries; then adds what the specs check:

- ``e2e-test-images/busybox:1.29-2``: the default container image;
- ``e2e-test-images/nginx:1.14-2`` and ``k8s-staging-cri-tools/hostnet-nginx-amd64``:
  Debian's ``nginx`` binary with the host's copies of the libraries ``ldd``
  names, a master process that writes ``/var/run/nginx.pid``, serving on 80
  (12003 for the host-network one);
- ``e2e-test-images/httpd:2.4.39-4``: busybox's ``httpd`` on port 80, saying
  ``httpd`` on stderr when it starts (the multi-container spec reads its log);
- ``e2e-test-images/nonewprivs:1.3``: the ``nonewprivs`` probe, setuid root;
- ``k8s-staging-cri-tools/test-image-*``: tags and users the image specs read
  (``User`` 1002, ``www-data``, ``1003:users``, ``www-data:users``; a user 1000
  in group 50000; three different images; one image under three tags);
- ``pause:3.9``: the pause image (critest pulls it "from two registries", both
  mirrored by the one registry here).

critest's ``--registry-prefix`` cannot serve here: critest 1.37 pulls the
prefixed name without its tag (``PrepareImageName`` keeps only the path) and
then creates the container from the unprefixed name, which no registry here
serves. So critest keeps its own names, and containerd reaches them as an
air-gapped cluster does: its registry host configuration (``config_path``,
one ``hosts.toml`` per registry critest names, ``UPSTREAMS``) makes the
loopback registry the mirror of each, over plain HTTP, for pull and resolve.
No name is ever resolved beyond loopback (this machine reaches no registry).

``test-image-digest@sha256:9700…`` names a digest only upstream's bytes have;
it cannot be made here, and its spec fails for every handler alike.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.cli import local_images
from shim.cli.local_images import Composed
from tests.kubelet.critest_tools import CriTools
from tests.kubelet.registry import LoopbackRegistry, push

#: the registries critest's image names point at; each gets the loopback mirror
UPSTREAMS = ("registry.k8s.io", "gcr.io", "k8s.gcr.io")
E2E = "e2e-test-images"
CRI_TOOLS = "k8s-staging-cri-tools"
PATH_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "nobody:x:65534:65534:nobody:/:/bin/false\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nusers:x:100:\nnogroup:x:65534:\n"


class Layer:
    """An uncompressed layer tar, built entry by entry (parents made as directories)."""

    def __init__(self) -> None:
        self._raw = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._raw, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by data()
        self._dirs: set[str] = set()

    def directory(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path or path in self._dirs:
            return
        self.directory(path.rpartition("/")[0])
        info = tarfile.TarInfo(path)
        info.type, info.mode = tarfile.DIRTYPE, mode
        self._tar.addfile(info)
        self._dirs.add(path)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.directory(path.rpartition("/")[0])
        info = tarfile.TarInfo(path)
        info.size, info.mode = len(data), mode
        self._tar.addfile(info, io.BytesIO(data))

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.directory(path.rpartition("/")[0])
        info = tarfile.TarInfo(path)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self._tar.addfile(info)

    def data(self) -> bytes:
        self._tar.close()
        return self._raw.getvalue()


def shared_libraries(binary: Path) -> list[Path]:
    """The host's files of the libraries ``ldd`` resolves for ``binary`` (loader included)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0] if words else ""
        if path.startswith("/"):
            found.append(Path(path))
    return found


def _etc(layer: Layer, passwd: str = PASSWD, group: str = GROUP) -> None:
    layer.file("etc/passwd", passwd.encode())
    layer.file("etc/group", group.encode())


def _programs(layer: Layer, programs: Mapping[str, Path]) -> None:
    """Each program at its path in the image, with the host's copies of its libraries."""
    libraries: set[Path] = set()
    for path, program in programs.items():
        layer.file(path, program.read_bytes(), 0o755)
        libraries.update(shared_libraries(program))
    for library in sorted(libraries):
        layer.file(str(library), library.resolve().read_bytes(), 0o755)


def support_layer(busybox: Path) -> bytes:
    """The libraries of ``busybox``, the users and groups of every image, and what
    busybox lacks and specs run: ``pgrep`` (procps) and ``ipcs`` (util-linux)."""
    layer = Layer()
    _etc(layer)
    _programs(layer, {f"usr/bin/{name}": Path(f"/usr/bin/{name}") for name in ("pgrep", "ipcs")})
    for library in shared_libraries(busybox):
        layer.file(str(library), library.resolve().read_bytes(), 0o755)
    return layer.data()


def nginx_layer(nginx: Path, port: int) -> bytes:
    """Debian's nginx, its libraries from the host, a config serving ``port``."""
    layer = Layer()
    _programs(layer, {"usr/sbin/nginx": nginx})
    layer.file("etc/nginx/nginx.conf", (
        "user www-data;\nworker_processes 1;\npid /var/run/nginx.pid;\nerror_log stderr;\n"
        "events { worker_connections 64; }\n"
        "http {\n  access_log /dev/stdout;\n"
        f"  server {{ listen {port}; root /usr/share/nginx/html; }}\n}}\n"
    ).encode())  # fmt: skip
    layer.file("usr/share/nginx/html/index.html", b"<h1>Welcome to nginx!</h1>\n")
    for d in ("var/log/nginx", "var/lib/nginx", "var/run"):
        layer.directory(d)
    return layer.data()


def _users(passwd: str = PASSWD, group: str = GROUP) -> bytes:
    layer = Layer()
    _etc(layer, passwd, group)
    return layer.data()


@dataclass(frozen=True)
class TestImage:
    """One image: where it is pushed (``repository`` and its tags), what it holds."""

    repository: str
    tags: tuple[str, ...]
    config: Mapping[str, Any]
    layers: tuple[bytes, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def compose(self, base: tuple[bytes, ...]) -> Composed:
        config = {"Env": PATH_ENV, "WorkingDir": "/", **self.config}
        if self.labels:
            config["Labels"] = dict(self.labels)
        return local_images.compose(
            config, f"critest image {self.repository}", [*base, *self.layers]
        )


def images(tools: CriTools) -> Iterator[TestImage]:
    """Every image the comparison pushes."""
    shell = {"Cmd": ["sh"]}
    yield TestImage(f"{E2E}/busybox", ("1.29-2",), shell)
    nginx = {"Cmd": ["nginx", "-g", "daemon off;"], "StopSignal": "SIGQUIT"}
    yield TestImage(f"{E2E}/nginx", ("1.14-2",), {**nginx, "ExposedPorts": {"80/tcp": {}}},
                    (nginx_layer(tools.nginx, 80),))  # fmt: skip
    yield TestImage(f"{CRI_TOOLS}/hostnet-nginx-amd64", ("latest",),
                    {**nginx, "ExposedPorts": {"12003/tcp": {}}},
                    (nginx_layer(tools.nginx, 12003),))  # fmt: skip
    www = Layer()
    www.file("var/www/index.html", b"<html><body><h1>It works!</h1></body></html>\n")
    yield TestImage(f"{E2E}/httpd", ("2.4.39-4",), {
        "Cmd": ["sh", "-c", "echo 'httpd: serving /var/www on port 80' >&2; "
                "exec httpd -f -v -p 80 -h /var/www"],
        "ExposedPorts": {"80/tcp": {}},
    }, (www.data(),))  # fmt: skip
    probe = Layer()
    probe.file("usr/local/bin/nonewprivs", tools.nonewprivs.read_bytes(), 0o4755)
    yield TestImage(f"{E2E}/nonewprivs", ("1.3",), {"Entrypoint": ["/usr/local/bin/nonewprivs"]},
                    (probe.data(),))  # fmt: skip
    yield TestImage(f"{CRI_TOOLS}/test-image-latest", ("latest",), shell)
    yield TestImage(f"{CRI_TOOLS}/test-image-tag", ("test", "all"), shell)
    for n in (1, 2, 3):
        yield TestImage(f"{CRI_TOOLS}/test-image-{n}", ("latest",), shell,
                        labels={"io.husk.critest.image": str(n)})  # fmt: skip
    yield TestImage(f"{CRI_TOOLS}/test-image-tags", ("1", "2", "3"), shell)
    for suffix, user in (
        ("uid", "1002"),
        ("username", "www-data"),
        ("uid-group", "1003:users"),
        ("username-group", "www-data:users"),
    ):
        yield TestImage(f"{CRI_TOOLS}/test-image-user-{suffix}", ("latest",),
                        {**shell, "User": user})  # fmt: skip
    predefined = _users(
        PASSWD + "user-defined-in-image:x:1000:1000::/home/user:/bin/sh\n",
        GROUP
        + "user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n",
    )
    yield TestImage(f"{CRI_TOOLS}/test-image-predefined-group", ("latest",), shell, (predefined,))
    yield TestImage("pause", ("3.9",), local_images.PAUSE_CONFIG)


def write_images_file(path: Path) -> Path:
    """critest's ``--test-images-file``: the default and web-server images, by name."""
    path.write_text(
        f"defaultTestContainerImage: {UPSTREAMS[0]}/{E2E}/busybox:1.29-2\n"
        f"webServerTestImage: {UPSTREAMS[0]}/{E2E}/nginx:1.14-2\n"
    )
    return path


def push_all(registry: LoopbackRegistry, tools: CriTools) -> list[str]:
    """Push every image; returns the references pushed (``host/repository:tag``)."""
    # hard links, as Docker's busybox: masking /bin/ls must not mask the shell
    base = (local_images.busybox_layer(tools.busybox, hard_links=True),
            support_layer(tools.busybox))  # fmt: skip
    pushed = []
    for image in images(tools):
        push(registry, image.repository, image.tags, image.compose(base))
        pushed += [f"{registry.host}/{image.repository}:{tag}" for tag in image.tags]
    return pushed
