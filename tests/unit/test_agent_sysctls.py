"""The pod network's sysctls: set once on the VM, kept out of the containers' specs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from agent_proto import agent_pb2
from guest.agent.config import AgentConfig
from guest.agent.oci import runc_config
from guest.agent.reaper import Reaper
from guest.agent.sandbox import Sandbox
from guest.agent.storage import SysfsLayout
from guest.agent.sysctls import PodNetworkSysctls, proc_path
from shim.errors import InvalidArgumentError
from shim.sandbox.oci import spec_from_json
from tests.unit.oci_samples import ctr_run_spec

#: what containerd 2's CRI puts on every pod's sandbox spec (not in the host's netns)
PING = "net.ipv4.ping_group_range"
PING_VALUE = "0 2147483647"


def fake_proc_sys(tmp_path: Path, *keys: str) -> Path:
    """A /proc/sys with a file for each sysctl, holding the kernel's default."""
    root = tmp_path / "proc-sys"
    for key in keys:
        path = root / proc_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("1\t0\n")
    return root


def test_net_sysctls_leave_a_containerd_2_spec_and_others_stay() -> None:
    spec = spec_from_json(ctr_run_spec("2.1.9"))
    spec.Linux.Sysctl[PING] = PING_VALUE
    spec.Linux.Sysctl["net.ipv4.ip_unprivileged_port_start"] = "0"
    spec.Linux.Sysctl["kernel.shm_rmid_forced"] = "1"
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/c1", oci_version="1.0.2")
    assert config["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}


def test_a_spec_with_only_net_sysctls_hands_the_runtime_none() -> None:
    spec = spec_from_json(ctr_run_spec("2.1.9"))
    spec.Linux.Sysctl[PING] = PING_VALUE
    config = runc_config(spec, root_path="/r", cgroups_path="/husk/c1")
    assert "sysctl" not in config["linux"]


def test_the_first_container_sets_the_pod_networks_sysctls_on_the_vm(tmp_path: Path) -> None:
    proc_sys = fake_proc_sys(tmp_path, PING, "kernel.shm_rmid_forced")
    pod = PodNetworkSysctls(proc_sys)
    pod.take("pause", {PING: PING_VALUE, "kernel.shm_rmid_forced": "1"})
    assert (proc_sys / "net/ipv4/ping_group_range").read_text() == PING_VALUE
    assert (proc_sys / "kernel/shm_rmid_forced").read_text() == "1\t0\n"  # not the VM's
    assert pod.applied == {PING: PING_VALUE}


def test_a_later_container_with_the_pods_value_is_not_set_again(tmp_path: Path) -> None:
    proc_sys = fake_proc_sys(tmp_path, PING)
    pod = PodNetworkSysctls(proc_sys)
    pod.take("pause", {PING: PING_VALUE})
    (proc_sys / "net/ipv4/ping_group_range").write_text("0\t2147483647\n")  # as the kernel shows
    pod.take("app1", {PING: PING_VALUE})
    assert (proc_sys / "net/ipv4/ping_group_range").read_text() == "0\t2147483647\n"


def test_each_sysctl_taken_from_the_spec_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pod = PodNetworkSysctls(fake_proc_sys(tmp_path, PING))
    caplog.set_level(logging.INFO, logger="husk.agent.sysctls")
    for cid in ("pause", "app1", "app2"):
        pod.take(cid, {PING: PING_VALUE})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"the pod's network sysctls from container pause set on the VM: {PING}={PING_VALUE}"
    ]


def test_a_later_container_cannot_change_the_pods_network(tmp_path: Path) -> None:
    pod = PodNetworkSysctls(fake_proc_sys(tmp_path, PING))
    pod.take("pause", {PING: PING_VALUE})
    with pytest.raises(InvalidArgumentError) as caught:
        pod.take("app", {PING: "0 0"})
    assert str(caught.value) == (
        f"container 'app' sets sysctl {PING}='0 0', but its network is the pod's, "
        f"which has {PING}='{PING_VALUE}': set it on the pod"
    )


def test_a_sysctl_the_vm_cannot_take_fails_naming_it_and_sets_nothing(tmp_path: Path) -> None:
    proc_sys = fake_proc_sys(tmp_path, PING)
    pod = PodNetworkSysctls(proc_sys)
    with pytest.raises(InvalidArgumentError) as caught:
        pod.take("pause", {PING: PING_VALUE, "net.ipv4.no_such_knob": "1"})
    assert str(caught.value) == (
        "sysctl net.ipv4.no_such_knob cannot be set on the VM's network: "
        "its kernel has no such sysctl"
    )
    assert (proc_sys / "net/ipv4/ping_group_range").read_text() == "1\t0\n"
    assert pod.applied is None  # the next first container tries again


def test_host_mode_sets_nothing_on_the_host(tmp_path: Path) -> None:
    proc_sys = fake_proc_sys(tmp_path, PING)
    pod = PodNetworkSysctls(proc_sys, host_mode=True)
    pod.take("pause", {PING: PING_VALUE})
    assert (proc_sys / "net/ipv4/ping_group_range").read_text() == "1\t0\n"
    assert pod.applied == {PING: PING_VALUE}


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("net.ipv4.ip_forward", "net/ipv4/ip_forward"),
        ("net/ipv4/ip_forward", "net/ipv4/ip_forward"),
        ("net.ipv4.conf.eth0/100.forwarding", "net/ipv4/conf/eth0.100/forwarding"),
        ("net/ipv4/conf/eth0.100/forwarding", "net/ipv4/conf/eth0.100/forwarding"),
    ],
)
def test_sysctl_names_in_either_form_name_their_file(key: str, path: str) -> None:
    assert proc_path(key) == Path(path)


@pytest.mark.parametrize("key", ["net.ipv4..x", "net/../../etc/passwd", "net.//.x", "net."])
def test_a_sysctl_name_that_leaves_proc_sys_is_refused(key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="is not a sysctl name"):
        proc_path(key)


def sandbox_with_fake_runtime(tmp_path: Path, proc_sys: Path) -> tuple[Sandbox, Reaper]:
    """A guest-mode sandbox whose runtime only answers ``features`` (and logs its calls)."""
    runtime = tmp_path / "crun"
    runtime.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
        '[ "$1" = features ] && echo \'{"ociVersionMax": "1.0.2"}\' && exit 0\nexit 1\n'
    )
    runtime.chmod(0o755)
    config = AgentConfig(
        state_dir=tmp_path / "state",
        shared_dir=tmp_path / "shared",
        runc=str(runtime),
        runc_root=tmp_path / "state" / "runc",
        proc_sys=proc_sys,
        sysfs=SysfsLayout(sys=tmp_path / "sys", dev=tmp_path / "dev"),
    )
    reaper = Reaper()
    return Sandbox(config, reaper), reaper


def pause_request(version: str, sysctls: dict[str, str]) -> agent_pb2.CreateContainerRequest:
    spec = spec_from_json(ctr_run_spec("2.1.9"))
    spec.Version = version
    for key, value in sysctls.items():
        spec.Linux.Sysctl[key] = value
    return agent_pb2.CreateContainerRequest(container_id="pause", OCI=spec)


@pytest.mark.parametrize(
    ("version", "sysctls", "error"),
    [
        ("1.2.1", {PING: PING_VALUE, "net.core.no_such": "1"}, "sysctl net.core.no_such"),
        ("2.0.0", {PING: PING_VALUE}, "ociVersion 2.0.0"),
    ],
)
async def test_a_container_refused_for_its_spec_leaves_nothing_behind(
    tmp_path: Path, version: str, sysctls: dict[str, str], error: str
) -> None:
    proc_sys = fake_proc_sys(tmp_path, PING)
    sandbox, reaper = sandbox_with_fake_runtime(tmp_path, proc_sys)
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        await sandbox.create(agent_pb2.CreateSandboxRequest(sandbox_id="sb"))
        with pytest.raises(InvalidArgumentError, match=error):
            await sandbox.create_container(pause_request(version, sysctls))
        nursery.cancel_scope.cancel()
    assert sandbox.containers == {}
    assert not sandbox.config.bundle_dir("pause").exists()
    assert (proc_sys / "net/ipv4/ping_group_range").read_text() == "1\t0\n"
    assert (tmp_path / "calls").read_text() == "features\n"  # no create was tried
