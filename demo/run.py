"""The README's first command: a container in a husk VM on a fresh Debian machine.

    sudo python3 demo/run.py

Installs what is missing (apt: containerd, runc, QEMU, busybox-static,
erofs-utils; a
project venv with husk), links ``containerd-shim-husk-v2`` into /usr/local/bin
so containerd finds it, builds the guest image, starts containerd if none is
running, imports a busybox image made locally from busybox-static, and runs::

    ctr run --runtime io.containerd.husk.v2 --rm docker.io/library/busybox:husk <id> uname -r

which prints the guest kernel's version. Only the standard library is used
until the venv exists; the rest runs under the venv's python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
APT_PACKAGES = (
    "containerd",
    "runc",
    "qemu-system-x86",
    "busybox-static",
    "python3-venv",
    "erofs-utils",  # husk image build: the shared root image
)
CONTAINERD_SOCK = "/run/containerd/containerd.sock"
CONTAINERD_LOG = Path("/var/log/husk-demo-containerd.log")
LINKS = ("containerd-shim-husk-v2", "husk")


def step(text: str) -> None:
    print(f"== {text}", flush=True)


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload,no-any-return]


def missing_packages() -> list[str]:
    missing = []
    for package in APT_PACKAGES:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in proc.stdout:
            missing.append(package)
    return missing


def install() -> None:
    missing = missing_packages()
    if missing:
        step(f"apt: installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run("apt-get", "update", "-q", env=env)
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env)
    if not (VENV / "bin" / "containerd-shim-husk-v2").exists():
        step(f"venv: installing husk into {VENV}")
        if not (VENV / "bin" / "python").exists():
            run(sys.executable, "-m", "venv", str(VENV))
        run(str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(REPO))
    for name in LINKS:
        link = Path("/usr/local/bin") / name
        target = VENV / "bin" / name
        if not link.is_symlink() or link.resolve() != target.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(target)


def containerd_answers() -> bool:
    proc = subprocess.run(
        ["ctr", "--address", CONTAINERD_SOCK, "version"], capture_output=True, check=False
    )
    return proc.returncode == 0


def ensure_containerd() -> None:
    if containerd_answers():
        return
    step(f"containerd: starting it (log: {CONTAINERD_LOG})")
    with CONTAINERD_LOG.open("ab") as log:
        subprocess.Popen(
            ["containerd"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not containerd_answers():
        if time.monotonic() > deadline:
            sys.exit(f"demo: containerd did not start; see {CONTAINERD_LOG}")
        time.sleep(0.2)


def in_venv() -> int:
    """The part that needs husk installed: image, containerd, busybox, ctr run."""
    from shim.cli import local_images

    step("guest image: husk image build")
    run(str(VENV / "bin" / "husk"), "image", "build")
    ensure_containerd()
    step(f"image: {local_images.BUSYBOX_REFERENCE} from busybox-static")
    tarball = Path("/var/lib/husk/busybox-oci.tar")
    local_images.build_busybox(tarball)
    run("ctr", "--address", CONTAINERD_SOCK, "image", "import", str(tarball),
        stdout=subprocess.DEVNULL)  # fmt: skip
    name = f"husk-demo-{uuid.uuid4().hex[:8]}"
    image = local_images.BUSYBOX_REFERENCE
    step(f"ctr run --runtime io.containerd.husk.v2 --rm {image} {name} uname -r")
    proc = subprocess.run(
        ["ctr", "--address", CONTAINERD_SOCK, "run", "--runtime", "io.containerd.husk.v2",
         "--rm", local_images.BUSYBOX_REFERENCE, name, "uname", "-r"],
        check=False,
    )  # fmt: skip
    print(f"(host kernel: {os.uname().release})")
    return proc.returncode


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it installs packages and starts containerd and VMs)")
    if "--in-venv" in sys.argv:
        return in_venv()
    install()
    os.chdir(REPO)
    python = str(VENV / "bin" / "python")
    return subprocess.run([python, "-m", "demo.run", "--in-venv"], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
