"""Sandboxes started as clones of a VM template, end to end (containerd + QEMU).

One containerd serves the module with ``[factory] enable_template``; its
kernel, initrd and root image are copies, so a test can make the template stale without
touching the image other tests boot. Whether a sandbox was cloned or booted
cold is read from the shim's own log line ("cloned from the VM template").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from bench.net_throughput import Pod, pod_netns
from plugins.qemu import features
from shim import config
from shim.cli import local_images
from shim.sandbox import cleanup, ram_holder
from shim.sandbox.factory import vm_template
from tests.integration.containerd import Containerd
from tests.integration.test_shim_containerd import RUNTIME, pytestmark  # noqa: F401

IMAGE = local_images.BUSYBOX_REFERENCE
HUSK = str(Path(sys.executable).parent / "husk")
CLONED = "cloned from the VM template"
COLD = "not started from the VM template"


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="htpl-", dir="/tmp"))
    yield path
    subprocess.run(
        [HUSK, "--config", str(path / "husk.toml"), "factory", "destroy"],
        capture_output=True,
        check=False,
    )
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def husk_toml(base: Path) -> Path:
    section = config.load(Path(__file__).parents[2] / "configuration.toml").hypervisor
    images = base / "images"
    images.mkdir()
    for key in ("kernel", "initrd", "image"):
        shutil.copy2(section[key], images / Path(section[key]).name)
    path = base / "husk.toml"
    path.write_text(
        f'[runtime]\nstate_dir = "{base}/state"\n'
        f'[factory]\nenable_template = true\ntemplate_path = "{base}/template"\n'
        f'[hypervisor.qemu]\nkernel = "{images / Path(section["kernel"]).name}"\n'
        f'initrd = "{images / Path(section["initrd"]).name}"\n'
        f'image = "{images / Path(section["image"]).name}"\n'
    )
    return path


@pytest.fixture(scope="module")
def ctd(husk_toml: Path) -> Iterator[Containerd]:
    root = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    daemon = Containerd(root, {"HUSK_CONFIG": str(husk_toml)})
    daemon.ctr("image", "import", str(local_images.build_busybox(root / "busybox.tar")))
    yield daemon
    daemon.stop()


@pytest.fixture
def pod() -> Iterator[Pod]:
    with pod_netns() as p:
        yield p


def cid() -> str:
    return "tp-" + uuid.uuid4().hex[:10]


def started_how(ctd: Containerd, name: str) -> str:
    """ "cloned" or "cold", from the shim's log line about this sandbox."""
    for line in ctd.log_text().splitlines():
        if f"sandbox {name}: " in line and "agent ready" in line:
            return "cloned" if CLONED in line else "cold"
    raise AssertionError(f"no boot line for sandbox {name}")


def run(ctd: Containerd, *args: str) -> str:
    return run_named(ctd, cid(), *args)


def run_named(ctd: Containerd, name: str, *args: str) -> str:
    return ctd.ctr("run", *RUNTIME, "--rm", IMAGE, name, *args).stdout.decode()


def remove(ctd: Containerd, *names: str) -> None:
    for name in names:
        ctd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        ctd.ctr("task", "delete", "-f", name, check=False)
        ctd.ctr("container", "rm", name, check=False)


def probe(ctd: Containerd, name: str, exec_id: str) -> list[str]:
    script = (
        "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    )
    out = ctd.ctr("task", "exec", "--exec-id", exec_id, name, "sh", "-c", script)
    return out.stdout.decode().split()


def test_a_clone_runs_a_container_from_its_image_with_a_bind_mount_and_a_pod_netns(
    ctd: Containerd, pod: Pod, tmp_path: Path
) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "in").write_text("from-host\n")
    run(ctd, "true")  # the first start makes the template; this one is a clone
    name = cid()
    script = (
        f"cat /vol/in; cat /etc/hostname; ip -o -4 addr show eth0; ping -c 1 -W 5 {pod.host_ip}"
    )
    out = ctd.ctr(
        "run", *RUNTIME, "--rm", "--with-ns", f"network:{pod.path}",
        "--mount", f"type=bind,src={volume},dst=/vol,options=rbind:rw",
        IMAGE, name, "sh", "-c", script,
    ).stdout.decode()  # fmt: skip
    assert started_how(ctd, name) == "cloned"
    assert out.startswith("from-host\nbusybox\n")
    assert pod.pod_ip in out and " 0% packet loss" in out


def test_two_clones_differ_in_randomness_boot_id_and_hostname(ctd: Containerd) -> None:
    a, b = cid(), cid()
    for name in (a, b):
        ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "600")
    try:
        assert started_how(ctd, a) == started_how(ctd, b) == "cloned"
        (boot_a, rng_a), (boot_b, rng_b) = probe(ctd, a, "p1"), probe(ctd, b, "p2")
        assert boot_a != boot_b
        assert rng_a != rng_b
        clock = ctd.ctr("task", "exec", "--exec-id", "d", a, "date", "+%s").stdout.decode()
        assert abs(int(clock) - time.time()) < 5  # the clone's clock is set, not the template's
    finally:
        remove(ctd, a, b)


def test_running_clones_outlive_their_template(ctd: Containerd, husk_toml: Path) -> None:
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "600")
    try:
        assert started_how(ctd, name) == "cloned"
        holder = ram_holder.Record.load(husk_toml.parent / "template" / "ram.json")
        assert holder is not None and holder.alive()
        husk = [HUSK, "--config", str(husk_toml), "factory"]
        subprocess.run([*husk, "destroy"], check=True, capture_output=True)
        assert subprocess.run([*husk, "status"], capture_output=True).returncode == 1
        assert not holder.alive()  # the clone's QEMU still maps the memfd
        script = "cat /proc/meminfo >/dev/null && echo still-here"
        out = ctd.ctr("task", "exec", "--exec-id", "e", name, "sh", "-c", script)
        assert out.stdout.decode() == "still-here\n"
    finally:
        remove(ctd, name)


def test_a_stale_template_is_made_again_not_used(ctd: Containerd, husk_toml: Path) -> None:
    run(ctd, "true")
    manifest = husk_toml.parent / "template" / "template.json"
    before = manifest.read_text()
    kernel = next((husk_toml.parent / "images").glob("vmlinu*"))
    os.utime(kernel)  # as a rebuilt image would: the file changed
    name = cid()
    ctd.ctr("run", *RUNTIME, "--rm", IMAGE, name, "true")
    assert started_how(ctd, name) == "cloned"
    assert manifest.read_text() != before
    assert "the template is stale" in ctd.log_text()


def test_a_damaged_template_makes_the_next_start_boot_cold_and_leaves_nothing(
    ctd: Containerd, husk_toml: Path
) -> None:
    run(ctd, "true")
    state_root = husk_toml.parent / "state"
    holder = ram_holder.Record.load(husk_toml.parent / "template" / "ram.json")
    assert holder is not None and holder.alive()
    os.kill(holder.pid, signal.SIGKILL)  # its RAM is gone with it
    name = cid()
    out = ctd.ctr("run", *RUNTIME, "--rm", IMAGE, name, "echo", "cold-but-fine")
    assert out.stdout.decode() == "cold-but-fine\n"
    assert started_how(ctd, name) == "cold"
    lines = [line for line in ctd.log_text().splitlines() if COLD in line and name in line]
    assert len(lines) == 1 and "damaged" in lines[0]
    deadline = time.monotonic() + 15
    while (state_root / name).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (state_root / name).exists()
    assert cleanup.processes_naming(state_root / name) == []
    again = cid()
    ctd.ctr("run", *RUNTIME, "--rm", IMAGE, again, "true")
    assert started_how(ctd, again) == "cloned"  # the next one makes a fresh template


def test_the_containers_of_a_pod_join_the_pods_clone(ctd: Containerd) -> None:
    pod, app = cid(), cid()
    annotations = lambda kind: [  # noqa: E731
        "--annotation", f"io.kubernetes.cri.container-type={kind}",
        "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
    ]  # fmt: skip
    ctd.ctr("run", *RUNTIME, "-d", *annotations("sandbox"), IMAGE, pod, "sleep", "600")
    try:
        ctd.ctr("run", *RUNTIME, "-d", *annotations("container"), IMAGE, app, "sleep", "600")
        assert started_how(ctd, pod) == "cloned"
        assert probe(ctd, pod, "x1")[0] == probe(ctd, app, "x2")[0]  # one VM: one boot_id
    finally:
        remove(ctd, app, pod)


def test_cold_boots_beyond_the_boot_slots_queue_and_all_answer(
    containerd_factory: object, tmp_path: Path
) -> None:
    cfg = tmp_path / "slots.toml"
    cfg.write_text(f'[runtime]\nstate_dir = "{tmp_path}/state"\nmax_parallel_boots = 1\n')
    daemon: Containerd = containerd_factory({"HUSK_CONFIG": str(cfg)})  # type: ignore[operator]
    daemon.ctr("image", "import", str(local_images.build_busybox(daemon.base / "bb.tar")))
    ctr = ["ctr", "--address", daemon.address, "run", *RUNTIME, "--rm", IMAGE]
    runs = [
        subprocess.Popen([*ctr, cid(), "echo", f"n{i}"], stdout=subprocess.PIPE) for i in range(3)
    ]
    outputs = sorted(p.communicate(timeout=300)[0].decode().strip() for p in runs)
    assert outputs == ["n0", "n1", "n2"]
    assert "all 1 boot slots are taken; waiting" in daemon.log_text()


def template_ram_fds(pid: int, ram: Path) -> dict[int, int]:
    """``pid``'s fds open on the template's RAM ``ram``: fd -> access mode (O_RDONLY, O_RDWR)."""
    target = os.stat(ram)
    found = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            st = os.stat(fd)
            fields = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found[int(fd.name)] = int(fields[fields.index("flags:") + 1], 8) & os.O_ACCMODE
    return found


def test_a_compromised_clone_qemu_cannot_change_the_template_ram_later_clones_start_from(
    ctd: Containerd, husk_toml: Path
) -> None:
    name = cid()
    ctd.ctr("run", *RUNTIME, "-d", IMAGE, name, "sleep", "600")
    try:
        assert started_how(ctd, name) == "cloned"
        pid = int((husk_toml.parent / "state" / name / "qemu" / "qemu.pid").read_text())
        ram = vm_template(config.load(husk_toml)).files.memory
        fds = template_ram_fds(pid, ram)
        assert len(fds) == 1
        ((fd, mode),) = fds.items()
        qemu = str(config.load(husk_toml).hypervisor["path"])
        # QEMU 8.2's readonly=on,rom=off opens it O_RDONLY; 7.2 (Debian 12) O_RDWR
        readonly = trio.run(features.maps_file_ram_readonly, qemu)
        assert mode == (os.O_RDONLY if readonly else os.O_RDWR)
        # what a guest that took over this QEMU can do with that fd (QEMU is root
        # when it opens it; the same file opened again read-write, as root can)
        before = ram.read_bytes()
        attack = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            offset = 1 << 20
            original = os.pread(attack, 8, offset)
            try:
                written = os.pwrite(attack, b"PWNED!!!", offset)
            except PermissionError:
                written = 0  # the write seal: EPERM
            else:
                os.pwrite(attack, original, offset)  # leave the template usable
            assert written == 0, "a clone's QEMU rewrote the template's RAM"
            with pytest.raises(PermissionError):
                os.ftruncate(attack, 0)
        finally:
            os.close(attack)
        assert ram.read_bytes() == before
        # the guest still writes its own (private) RAM
        fill = "dd if=/dev/zero of=/dev/shm/fill bs=1M count=32 2>/dev/null && echo written"
        out = ctd.ctr("task", "exec", "--exec-id", "w", name, "sh", "-c", fill)
        assert out.stdout.decode() == "written\n"
        later = cid()
        assert run_named(ctd, later, "echo", "later-clone") == "later-clone\n"
        assert started_how(ctd, later) == "cloned"
    finally:
        remove(ctd, name)
