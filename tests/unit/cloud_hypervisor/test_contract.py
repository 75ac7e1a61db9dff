"""The API description, the contract server's VMM, the HTTP client and the event parser.

The description (``api.json``) is written from Cloud Hypervisor's OpenAPI
document; these tests hold the driver's client to it and the server to
Cloud Hypervisor's VMM (``vmm/src/lib.rs``) in-process, without a binary.
"""

from __future__ import annotations

import ast
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from plugins.cloud_hypervisor import driver as driver_module
from plugins.cloud_hypervisor.api import ApiClient, ApiError, ApiUnreachableError
from plugins.cloud_hypervisor.events import EventParser
from plugins.cloud_hypervisor.vmconfig import ChSettings, VmPaths, vm_config
from shim.errors import DeadlineExceededError
from shim.hypervisor import VmSpec
from tests.unit.cloud_hypervisor.contract import Contract
from tests.unit.cloud_hypervisor.server import ContractServer

MIB = 1 << 20
CONFIG = {
    "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
    "memory": {"size": 256 * MIB, "shared": True},
    "payload": {"kernel": "/vmlinux", "cmdline": "console=ttyS0"},
}


@asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[tuple[ContractServer, ApiClient]]:
    server = ContractServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, tmp / "api.sock")
        yield server, ApiClient(tmp / "api.sock", 2.0)
        nursery.cancel_scope.cancel()


@pytest.fixture
def tmp() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="chc-", dir="/tmp"))


def endpoints_the_driver_calls() -> set[str]:
    """Every literal endpoint in the plugin's ``api.get``/``api.put``/``request`` calls."""
    found = set()
    for module in ("driver.py", "api.py"):
        tree = ast.parse(Path(driver_module.__file__).with_name(module).read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr in ("get", "put", "request", "_try"):
                for arg in node.args[:2]:
                    if isinstance(arg, ast.Constant) and str(arg.value).startswith("vm"):
                        found.add(str(arg.value))
    return found


def test_every_endpoint_the_driver_calls_is_in_the_description() -> None:
    described = {path.lstrip("/") for path in Contract().paths}
    called = endpoints_the_driver_calls()
    assert called >= {"vm.create", "vm.boot", "vm.add-disk", "vm.add-net", "vm.add-fs"}
    assert called <= described, called - described


def test_the_vm_config_the_driver_builds_keeps_the_description(tmp: Path) -> None:
    spec = VmSpec("sb", tmp, 2, 512, Path("/k"), Path("/i"), max_vcpus=4, max_memory_mib=4096)
    body = vm_config(spec, ChSettings.from_section({}), VmPaths(tmp), [], [], bytes(32))
    assert Contract().request_problems("PUT", "vm.create", json.dumps(body).encode()) == []
    assert body["memory"]["hotplug_size"] == 3584 * MIB  # whole 128 MiB regions


def test_the_guest_gets_the_secret_as_an_oem_string_in_the_api_body_not_the_cmdline(
    tmp: Path,
) -> None:
    spec = VmSpec("sb", tmp, 1, 512, Path("/k"), Path("/i"))
    secret = bytes(range(32))
    body = vm_config(spec, ChSettings.from_section({}), VmPaths(tmp), [], [], secret)
    assert body["platform"] == {"oem_strings": ["io.husk.agent-secret=" + secret.hex()]}
    assert secret.hex() not in body["payload"]["cmdline"]


def test_a_misspelt_field_breaks_the_contract_though_cloud_hypervisor_would_ignore_it() -> None:
    bad = {**CONFIG, "cpus": {"boot_vcpus": 1, "max_vcpus": 2, "max_vcpu": 4}}
    problems = Contract().request_problems("PUT", "vm.create", json.dumps(bad).encode())
    assert problems == [
        "PUT vm.create: cpus: Additional properties are not allowed ('max_vcpu' was unexpected)"
    ]


def test_a_missing_required_field_breaks_the_contract() -> None:
    body = {"tag": "t", "socket": "/s", "num_queues": 1}
    problems = Contract().request_problems("PUT", "vm.add-fs", json.dumps(body).encode())
    assert problems == ["PUT vm.add-fs: (body): 'queue_size' is a required property"]


async def test_boot_before_create_is_404_with_cloud_hypervisors_messages(tmp: Path) -> None:
    async with serving(tmp) as (server, api):
        with pytest.raises(ApiError) as info:
            await api.put("vm.boot")
    assert info.value.status == 404
    assert str(info.value) == (
        "cloud-hypervisor: PUT vm.boot: 404 Not Found: Error from API; "
        "The VM could not boot; VM is not created"
    )
    assert server.violations == []


async def test_the_vm_goes_created_running_paused_and_back_to_created(tmp: Path) -> None:
    async with serving(tmp) as (server, api):
        await api.put("vm.create", CONFIG)
        states = [(await api.get("vm.info"))["state"]]
        for step in ("vm.boot", "vm.pause", "vm.resume", "vm.shutdown"):
            await api.put(step)
            states.append((await api.get("vm.info"))["state"])
        await api.put("vm.boot")  # Cloud Hypervisor kept the config: it boots again
        await api.put("vm.delete")
        with pytest.raises(ApiError) as info:
            await api.get("vm.info")
    assert states == ["Created", "Running", "Paused", "Running", "Created"]
    assert info.value.status == 404
    assert server.violations == []


@pytest.mark.parametrize(
    ("steps", "endpoint", "status"),
    [
        (["vm.create"], "vm.create", 500),  # VmAlreadyCreated
        (["vm.create", "vm.boot"], "vm.boot", 500),  # VmAlreadyCreated
        (["vm.create"], "vm.shutdown", 500),  # VmNotRunning
        (["vm.create"], "vm.counters", 500),  # VmNotRunning
        (["vm.create", "vm.boot"], "vm.resume", 500),  # Running -> Running
        ([], "vm.resize", 404),  # VmNotCreated
    ],
)
async def test_wrong_transitions_fail_with_the_status_cloud_hypervisor_maps_them_to(
    tmp: Path, steps: list[str], endpoint: str, status: int
) -> None:
    bodies = {"vm.create": CONFIG, "vm.resize": {"desired_vcpus": 2}}
    async with serving(tmp) as (server, api):
        for step in steps:
            await api.put(step, bodies.get(step))
        with pytest.raises(ApiError) as info:
            method = "GET" if endpoint == "vm.counters" else "PUT"
            await api.request(method, endpoint, bodies.get(endpoint))
    assert info.value.status == status
    assert server.violations == []


async def test_a_body_the_description_refuses_is_answered_400_and_recorded(tmp: Path) -> None:
    async with serving(tmp) as (server, api):
        with pytest.raises(ApiError) as info:
            await api.put("vm.create", {"payload": {"kernel": 7}})
    assert info.value.status == 400
    assert server.violations == ["PUT vm.create: payload/kernel: 7 is not of type 'string'"]


async def test_net_fds_travel_with_the_request_and_must_match_the_queues(tmp: Path) -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    fds = [pair[0].fileno() for pair in pairs]
    async with serving(tmp) as (server, api):
        await api.put("vm.create", {**CONFIG, "cpus": {"boot_vcpus": 2, "max_vcpus": 2}})
        with pytest.raises(ApiError) as info:
            await api.put("vm.add-net", {"id": "eth0", "num_queues": 2}, fds)
        await api.put("vm.add-net", {"id": "eth0", "num_queues": 4}, fds)
    assert info.value.status == 400
    assert [r.fds for r in server.requests if r.endpoint == "vm.add-net"] == [2, 2]
    for pair in pairs:
        for sock in pair:
            sock.close()


async def test_a_request_nobody_answers_fails_at_its_deadline(tmp: Path) -> None:
    async with serving(tmp) as (server, api):
        server.hang.add("vm.info")
        with pytest.raises(DeadlineExceededError) as info:
            await api.request("GET", "vm.info", timeout=0.2)
    assert str(info.value) == "cloud-hypervisor: GET vm.info got no answer within 0.2 s"


async def test_no_socket_is_unreachable_and_says_it_is_absent(tmp: Path) -> None:
    with pytest.raises(ApiUnreachableError) as info:
        await ApiClient(tmp / "none.sock", 1.0).get("vmm.ping")
    assert info.value.absent
    assert str(info.value) == (
        f"cloud-hypervisor: cannot connect to its API socket {tmp / 'none.sock'}: "
        "No such file or directory"
    )


def test_events_are_parsed_across_reads_and_garbage_is_skipped() -> None:
    parser = EventParser()
    first = (
        json.dumps(
            {
                "timestamp": {"secs": 0, "nanos": 1},
                "source": "vm",
                "event": "booted",
                "properties": None,
            },
            indent=2,
        ).encode()
        + b"\n\n"
    )
    panic = (
        json.dumps(
            {"source": "guest", "event": "panic", "properties": {"event": "panic"}}, indent=2
        ).encode()
        + b"\n\n"
    )
    stream = first + b"garbage\n" + panic
    events = []
    for i in range(0, len(stream), 7):
        events += parser.feed(stream[i : i + 7])
    assert [(e.source, e.event) for e in events] == [("vm", "booted"), ("guest", "panic")]
    assert events[1].properties == {"event": "panic"}
