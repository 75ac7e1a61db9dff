"""``husk check``: what this host offers a husk sandbox, and whether one can start.

Each probe yields a ``Finding``; a finding that is ``blocking`` means no sandbox
can start with the effective config, and ``husk check`` exits non-zero.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from shim import registry
from shim.config import Config
from shim.errors import NotSupportedError
from shim.host import HostFacts
from shim.hypervisor import GUEST_FILE_KEYS

Runner = Callable[[Sequence[str]], str | None]

VIRTIOFSD_PLACES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    blocking: bool = False


def run_version(argv: Sequence[str]) -> str | None:
    """Run a binary and return its output, or None when it cannot run."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout + proc.stderr


def _first_version(text: str) -> str:
    m = re.search(r"\d+\.\d+(\.\d+)?", text)
    return m.group(0) if m else text.strip().splitlines()[0]


def probe(config: Config, host: HostFacts, run: Runner = run_version) -> list[Finding]:
    """All findings for this host and config."""
    findings = [
        Finding("kvm", host.kvm_usable, host.kvm_reason),
        Finding(
            "vhost-vsock",
            host.vhost_vsock,
            "present: the agent can use vsock"
            if host.vhost_vsock
            else f"missing (/dev/vhost-vsock): the agent will use {config.agent.transport}",
        ),
    ]
    findings += _qemu_findings(config, run)
    findings.append(_virtiofsd_finding(config))
    findings.append(_vmm_finding("cloud-hypervisor", config, host, run))
    findings.append(_containerd_finding(run))
    findings.append(_iptables_finding())
    findings.append(_image_finding(config))
    findings.append(_sandbox_finding(config, host))
    return findings


def _qemu_findings(config: Config, run: Runner) -> list[Finding]:
    section = config.hypervisors.get("qemu")
    binary = str(section["path"]) if section else "qemu-system-x86_64"
    out = run([binary, "--version"])
    if out is None:
        return [Finding("qemu", False, f"{binary} not found or does not run")]
    found = [Finding("qemu", True, f"{binary}, version {_first_version(out)}")]
    devices = run([binary, "-nodefaults", "-machine", "none", "-device", "help"]) or ""
    has_9p = "virtio-9p-pci" in devices
    has_fs = "vhost-user-fs-pci" in devices
    found.append(
        Finding("9p", has_9p, "QEMU has virtio-9p-pci" if has_9p else "QEMU lacks virtio-9p-pci")
    )
    found.append(
        Finding(
            "virtio-fs",
            has_fs,
            "QEMU has vhost-user-fs-pci" if has_fs else "QEMU lacks vhost-user-fs-pci",
        )
    )
    if section and section.get("image"):
        has_pmem = "virtio-pmem-pci" in devices
        found.append(
            Finding(
                "virtio-pmem",
                has_pmem,
                "QEMU has virtio-pmem-pci: every VM maps the one root image"
                if has_pmem
                else "QEMU lacks virtio-pmem-pci, which [hypervisor.qemu] image needs: "
                'set image = "" and initrd to the image dir\'s initrd.img',
            )
        )
    found.append(_template_ram_finding(binary, run))
    return found


def _template_ram_finding(binary: str, run: Runner) -> Finding:
    """How VM clones hold the template's RAM: a write-sealed memfd, read-only too with
    QEMU 8.2's rom=off."""
    argv = [binary, "-nodefaults", "-machine", "none", "-object", "memory-backend-file,help"]
    readonly = "rom=" in (run(argv) or "")
    return Finding(
        "template-ram",
        True,
        "VM clones open the template's RAM read-only (memory-backend-file rom=off); "
        "it is a write-sealed memfd"
        if readonly
        else "VM clones open the template's RAM read-write (no memory-backend-file rom=off "
        "before QEMU 8.2), but it is a write-sealed memfd: writes through that fd fail",
    )


def _virtiofsd_finding(config: Config) -> Finding:
    places = list(VIRTIOFSD_PLACES)
    which = shutil.which("virtiofsd")
    if which:
        places.append(which)
    for place in places:
        if place and Path(place).is_file():
            return Finding("virtiofsd", True, place)
    return Finding("virtiofsd", False, 'not found: shared_fs = "virtio-fs" is unavailable')


def _vmm_finding(name: str, config: Config, host: HostFacts, run: Runner) -> Finding:
    """A VMM other than the selected one: its binary's version, and what else this host
    lacks for it (KVM, helpers), as its plugin says; the guest image has its own line."""
    section = config.hypervisors.get(name)
    binary = str(section["path"]) if section else name
    out = run([binary, "--version"])
    lacks = []
    if section is not None:
        lacks = [
            p
            for p in registry.lookup(name).unmet_requirements(section, host)
            if "(key 'path')" not in p and not p.startswith("guest ")
        ]
    found = f"{binary}, version {_first_version(out)}" if out is not None else f"{binary} not found"
    if lacks:
        found += "; no sandbox can start with it here: " + "; ".join(lacks)
    return Finding(name, out is not None and not lacks, found)


def _containerd_finding(run: Runner) -> Finding:
    out = run(["containerd", "--version"])
    if out is None:
        return Finding("containerd", False, "containerd not found")
    parts = out.split()
    version = parts[2] if len(parts) > 2 else _first_version(out)
    return Finding("containerd", True, f"version {version.lstrip('v')}")


def _iptables_finding() -> Finding:
    """Port-forward into a pod's VM needs a NAT rule in the pod's netns
    (:mod:`shim.network.portforward`); without iptables a pod runs, unforwarded."""
    found = shutil.which("iptables")
    if found:
        return Finding("iptables", True, f"{found}: port-forward into pods")
    return Finding("iptables", False, "not found: port-forward into pods is unavailable")


def _image_finding(config: Config) -> Finding:
    from guest.image import find_image  # the recipe's own reading of its manifest

    files = {k: str(config.hypervisor[k]) for k in GUEST_FILE_KEYS if config.hypervisor.get(k)}
    missing = [p for p in files.values() if not Path(p).is_file()]
    if missing:
        return Finding(
            "guest image", False, f"missing {', '.join(missing)}: run `husk image build`"
        )
    manifest = find_image(config.runtime.image_dir)
    built = (
        f", built {manifest.built_at}, kernel {manifest.kernel_version}"
        if manifest
        else f", no valid manifest in {config.runtime.image_dir}"
    )
    named = ", ".join(f"{k} {p}" for k, p in files.items())
    return Finding("guest image", True, f"{named}{built}")


def _sandbox_finding(config: Config, host: HostFacts) -> Finding:
    name = config.runtime.hypervisor
    plugin = registry.lookup(name)
    problems = plugin.unmet_requirements(config.hypervisor, host)
    try:
        plugin.create(config.hypervisor)  # builds the driver object only: starts nothing
    except NotSupportedError as e:
        problems.insert(0, str(e))
    if problems:
        return Finding("sandbox", False, "cannot start: " + "; ".join(problems), blocking=True)
    accel = config.hypervisor.get("accel", "kvm")
    return Finding(
        "sandbox",
        True,
        f"can start with hypervisor '{name}' ({accel}), agent over {config.agent.transport}",
    )


def render_text(findings: Sequence[Finding]) -> str:
    """The report in words, one line a finding."""
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        mark = "ok " if f.ok else ("FAIL" if f.blocking else "no ")
        lines.append(f"{mark:4} {f.name:<{width}}  {f.detail}")
    return "\n".join(lines)


def render_json(findings: Sequence[Finding]) -> str:
    """The report as JSON: overall ``ok`` and each finding."""
    return json.dumps(
        {"ok": can_start(findings), "checks": [asdict(f) for f in findings]}, indent=2
    )


def can_start(findings: Sequence[Finding]) -> bool:
    """True when no finding blocks a sandbox."""
    return not any(f.blocking for f in findings)
