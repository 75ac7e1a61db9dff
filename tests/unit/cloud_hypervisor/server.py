"""A stand-in for Cloud Hypervisor's API server: checks every request, plays the VMM.

``ContractServer`` serves HTTP/1.1 (h11) on a unix socket, reads fds sent with a
request (``SCM_RIGHTS``), holds each request against the API description
(``contract.Contract``) and answers from ``VmmModel``, which plays Cloud
Hypervisor's VMM as ``vmm/src/lib.rs`` does: no VM → created (``vm.create``
stores the config) → running (``vm.boot``) ↔ paused → back to created
(``vm.shutdown``: Cloud Hypervisor drops the VM and keeps its config) → no VM
(``vm.delete``); errors with the statuses the code maps them to
(``VmNotCreated``/``VmMissingConfig`` 404, ``VmAlreadyCreated``/``VmNotRunning``
500, config validation 400, duplicate ids 409, a pending vCPU removal 429) and
a JSON array of messages. Every answer is held against the description too.

A request that breaks the description is answered 400 and recorded in
``violations``; tests end by asserting there are none.
"""

from __future__ import annotations

import array
import json
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trio

from tests.unit.cloud_hypervisor.contract import API_ROOT, Contract

MIB = 1 << 20
#: where each kind of device sits in a VmConfig
_GROUPS = {"disk": "disks", "net": "net", "fs": "fs"}


@dataclass
class Answer:
    """A status and a JSON body (None: no body)."""

    status: int
    body: Any = None


def error(status: int, *messages: str) -> Answer:
    """An error as Cloud Hypervisor answers it: the status and the chain of messages."""
    return Answer(status, list(messages))


@dataclass
class Request:
    """One request as the server saw it (tests read the log of these)."""

    method: str
    endpoint: str
    body: Any
    fds: int
    status: int = 0


@dataclass
class VmmModel:
    """Cloud Hypervisor's VMM: its VM config, whether a VM is booted, devices, memory."""

    config: dict[str, Any] | None = None
    #: a VM exists (``VmOwnership::Owned``): booted, running or paused
    booted: bool = False
    paused: bool = False
    #: hot-plugged devices: id -> PCI address
    bdfs: dict[str, str] = field(default_factory=dict)
    #: devices the guest has been asked to eject: id -> vm.info polls until it has
    ejecting: dict[str, int] = field(default_factory=dict)
    plugged_mib: int = 0
    #: fds received with each ``vm.add-net``, by NIC id (kept open, as the VMM would)
    net_fds: dict[str, list[int]] = field(default_factory=dict)
    #: vm.info polls before the guest has ejected a removed device
    eject_polls: int = 1
    #: the next so many ``vm.resize`` calls find a vCPU removal pending (429)
    busy_resizes: int = 0
    #: what the guest plugs of a virtio-mem request: None = all of it
    guest_plugs_mib: int | None = None
    on_event: Callable[[str, str], None] = lambda source, event: None
    _next_slot: int = 4

    # -- the VM's life --------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> Answer:
        if self.config is not None:
            return error(
                500, "Error from API", "The VM could not be created", "VM is already created"
            )
        problems = validate_config(body)
        if problems:
            return error(400, "Error from API", *problems)
        self.config = body
        self.plugged_mib = 0
        serial = body.get("serial", {})
        if serial.get("mode") == "Socket":
            # pre_create_console_devices: the console socket exists from vm.create on
            _listen_unix(serial["socket"])
        return Answer(204)

    def boot(self) -> Answer:
        if self.booted:
            return error(500, "Error from API", "The VM could not boot", "VM is already created")
        if self.config is None:
            return error(404, "Error from API", "The VM could not boot", "VM is not created")
        for problem in device_problems(self.config):
            return error(500, "Error from API", "The VM could not boot", problem)
        self.on_event("vm", "booting")
        self.booted, self.paused = True, False
        self.on_event("vm", "booted")
        return Answer(204)

    def shutdown(self) -> Answer:
        if not self.booted:
            return error(500, "Error from API", "The VM could not shutdown", "VM is not running")
        self.booted = self.paused = False
        self.bdfs.clear()
        self.on_event("vm", "shutdown")
        return Answer(204)

    def delete(self) -> Answer:
        if self.config is None:
            return Answer(204)
        if self.booted:
            self.shutdown()
        self.config = None
        self.on_event("vm", "deleted")
        return Answer(204)

    def pause(self) -> Answer:
        if not self.booted:
            return error(500, "Error from API", "The VM could not pause", "VM is not running")
        if self.paused:
            return error(500, "Error from API", "Invalid transition from Paused to Paused")
        self.paused = True
        self.on_event("vm", "paused")
        return Answer(204)

    def resume(self) -> Answer:
        if not self.booted:
            return error(500, "Error from API", "The VM could not resume", "VM is not running")
        if not self.paused:
            return error(500, "Error from API", "Invalid transition from Running to Running")
        self.paused = False
        self.on_event("vm", "resumed")
        return Answer(204)

    # -- reading ---------------------------------------------------------------------

    def info(self) -> Answer:
        if self.config is None:
            return error(404, "Error from API", "VM is not created")
        for device_id in list(self.ejecting):
            self.ejecting[device_id] -= 1
            if self.ejecting[device_id] < 0:
                del self.ejecting[device_id]
                self.bdfs.pop(device_id, None)
                self._forget(device_id)
        state = ("Paused" if self.paused else "Running") if self.booted else "Created"
        memory = self.config.get("memory", {})
        body: dict[str, Any] = {
            "config": self.config,
            "state": state,
            "memory_actual_size": int(memory.get("size", 0)) + self.plugged_mib * MIB,
        }
        if self.booted:
            body["device_tree"] = {
                d: {"id": d, "children": [], "resources": [], "pci_bdf": bdf}
                for d, bdf in self.bdfs.items()
            } | {d: {"id": d, "children": [], "resources": []} for d in self._cold_ids()}
        return Answer(200, body)

    def counters(self) -> Answer:
        if not self.booted:
            return error(500, "Error from API", "VM is not running")
        ids = [*self._cold_ids(), *self.bdfs]
        return Answer(200, {d: {"read_bytes": 0, "write_bytes": 0} for d in ids})

    # -- devices ----------------------------------------------------------------------

    def add(self, kind: str, body: dict[str, Any], fds: list[int]) -> Answer:
        if self.config is None:
            return error(404, "Error from API", "VM is not created")
        device_id = body.get("id", "")
        if device_id in self._all_ids():
            return error(409, "Error from API", f"Identifier {device_id} is not unique")
        if kind == "net":
            problem = net_problem(body, fds, self.config)
            if problem:
                return error(400, "Error from API", problem)
            self.net_fds[device_id] = fds
        if kind == "fs" and not self.config.get("memory", {}).get("shared"):
            return error(400, "Error from API", "Using vhost-user requires using shared memory")
        self.config.setdefault(_GROUPS[kind], []).append(body)
        if not self.booted:
            return Answer(204)
        for problem in device_problems({_GROUPS[kind]: [body]}):
            self._forget(device_id)
            return error(500, "Error from API", "Failed to add the device", problem)
        bdf = f"0000:00:{self._next_slot:02x}.0"
        self._next_slot += 1
        self.bdfs[device_id] = bdf
        return Answer(200, {"id": device_id, "bdf": bdf})

    def remove(self, body: dict[str, Any]) -> Answer:
        device_id = body.get("id", "")
        if self.config is None:
            return error(404, "Error from API", "VM is not created")
        if device_id not in self._all_ids() or device_id in self.ejecting:
            return error(404, "Error from API", f"Unknown device id: {device_id}")
        if self.booted:
            self.ejecting[device_id] = self.eject_polls
        else:
            self._forget(device_id)
        return Answer(204)

    # -- size -------------------------------------------------------------------------

    def resize(self, body: dict[str, Any]) -> Answer:
        if self.config is None:
            return error(404, "Error from API", "VM is not created")
        if self.busy_resizes > 0:
            self.busy_resizes -= 1
            return error(429, "Error from API", "Pending vCPU removal")
        cpus, memory = self.config["cpus"], self.config["memory"]
        vcpus = body.get("desired_vcpus")
        if vcpus is not None and vcpus > cpus["max_vcpus"]:
            return error(500, "Error from API", f"Desired vCPUs {vcpus} above max_vcpus")
        ram = body.get("desired_ram")
        if ram is not None:
            room = int(memory.get("hotplug_size", 0))
            if ram < memory["size"] or ram > memory["size"] + room:
                return error(500, "Error from API", "Invalid amount of memory to hotplug")
            if memory.get("hotplug_method") != "VirtioMem" or ram % (2 * MIB):
                return error(500, "Error from API", "Memory resize needs virtio-mem, 2 MiB blocks")
        if vcpus is not None:
            cpus["boot_vcpus"] = vcpus
        if ram is not None:
            wanted = (ram - memory["size"]) // MIB
            got = wanted if self.guest_plugs_mib is None else min(wanted, self.guest_plugs_mib)
            self.plugged_mib = got if self.booted else 0
            if wanted:
                memory["hotplugged_size"] = wanted * MIB
            else:
                memory.pop("hotplugged_size", None)
        self.on_event("vm", "resized")
        return Answer(204)

    # -- internals -------------------------------------------------------------------

    def _cold_ids(self) -> list[str]:
        return [d for d in self._all_ids() if d not in self.bdfs]

    def _all_ids(self) -> list[str]:
        config = self.config or {}
        return [
            str(device.get("id", ""))
            for group in ("disks", "net", "fs")
            for device in config.get(group, [])
        ]

    def _forget(self, device_id: str) -> None:
        assert self.config is not None
        for group in ("disks", "net", "fs"):
            if group in self.config:
                self.config[group] = [d for d in self.config[group] if d.get("id") != device_id]
        for fd in self.net_fds.pop(device_id, []):
            os.close(fd)


def validate_config(body: dict[str, Any]) -> list[str]:
    """Cloud Hypervisor's own checks of a ``VmConfig`` (``vmm/src/config.rs``: validate)."""
    problems = []
    cpus = body.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
    if cpus["boot_vcpus"] > cpus["max_vcpus"]:
        problems.append("Max is less than boot")
    if body.get("fs") and not body.get("memory", {}).get("shared"):
        problems.append("Using vhost-user requires using shared memory")
    for nic in body.get("net", []):
        if "num_queues" in nic and nic["num_queues"] < 2:
            problems.append(f"Number of queues to virtio_net ({nic['num_queues']}) is lower than 2")
    return problems


def net_problem(body: dict[str, Any], fds: list[int], config: dict[str, Any]) -> str | None:
    """A NetConfig Cloud Hypervisor refuses (400), or one husk must never send."""
    queues = body.get("num_queues", 2)
    if fds and queues != 2 * len(fds):
        return f"Number of queues ({queues}) does not match the number of fds ({len(fds)})"
    if queues // 2 > config["cpus"]["boot_vcpus"]:
        return "Number of queue pairs is higher than the number of vCPUs"
    if not fds and not body.get("tap"):
        # Cloud Hypervisor would make a tap of its own: never what husk means
        return "contract: a NIC with neither a tap name nor tap fds"
    for fd in fds:
        if not stat.S_ISCHR(os.fstat(fd).st_mode) and not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return f"fd {fd} is not a tap (character device) or socket"
    return None


def device_problems(config: dict[str, Any]) -> list[str]:
    """What makes a device fail to open at boot or hot-plug: no disk file, no vhost socket."""
    problems = []
    for disk in config.get("disks", []):
        if not Path(disk["path"]).exists():
            problems.append(f"Failed to open disk file {disk['path']}")
    for share in config.get("fs", []):
        try:
            ok = stat.S_ISSOCK(os.stat(share["socket"]).st_mode)
        except OSError:
            ok = False
        if not ok:
            problems.append(f"Failed to connect to vhost-user socket {share['socket']}")
    return problems


def _listen_unix(path: str) -> None:
    """Bind a listening socket at ``path`` and leave it open (the VMM's console socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(path).unlink(missing_ok=True)
    sock.bind(path)
    sock.listen(1)
    _kept.append(sock)


_kept: list[socket.socket] = []

#: endpoints with a body, and what the model does with it
_WITH_BODY = {
    "vm.create": lambda m, b, f: m.create(b),
    "vm.resize": lambda m, b, f: m.resize(b),
    "vm.add-disk": lambda m, b, f: m.add("disk", b, f),
    "vm.add-net": lambda m, b, f: m.add("net", b, f),
    "vm.add-fs": lambda m, b, f: m.add("fs", b, f),
    "vm.remove-device": lambda m, b, f: m.remove(b),
}
_WITHOUT_BODY = {
    ("PUT", "vm.boot"): VmmModel.boot,
    ("PUT", "vm.shutdown"): VmmModel.shutdown,
    ("PUT", "vm.delete"): VmmModel.delete,
    ("PUT", "vm.pause"): VmmModel.pause,
    ("PUT", "vm.resume"): VmmModel.resume,
    ("GET", "vm.info"): VmmModel.info,
    ("GET", "vm.counters"): VmmModel.counters,
}


class ContractServer:
    """Serves the model on a unix socket, holding every request and answer to the contract."""

    def __init__(self, model: VmmModel | None = None, contract: Contract | None = None) -> None:
        self.model = model if model is not None else VmmModel()
        self.contract = contract if contract is not None else Contract()
        self.requests: list[Request] = []
        self.violations: list[str] = []
        #: set when ``vmm.shutdown`` was answered: the VMM exits
        self.shutdown = trio.Event()
        #: endpoints that never answer (the test of a request's deadline)
        self.hang: set[str] = set()
        #: a hook run on each request before it is answered (e.g. to record it to a file)
        self.on_request: Callable[[Request], None] = lambda request: None

    def answer(self, method: str, endpoint: str, raw: bytes, fds: list[int]) -> Answer:
        """The model's answer to one request, after holding it against the description."""
        problems = self.contract.request_problems(method, endpoint, raw)
        body = json.loads(raw) if raw and not problems else None
        request = Request(method, endpoint, body, len(fds))
        self.requests.append(request)
        if problems:
            self.violations += problems
            reply = error(400, "Failed to deserialize JSON", *problems)
        else:
            reply = self._dispatch(method, endpoint, body, fds)
        request.status = reply.status
        self.violations += self.contract.response_problems(
            method, endpoint, reply.status, reply.body
        )
        self.on_request(request)
        return reply

    def _dispatch(self, method: str, endpoint: str, body: Any, fds: list[int]) -> Answer:
        model = self.model
        if endpoint in _WITH_BODY:
            return _WITH_BODY[endpoint](model, body, fds)
        if (method, endpoint) in _WITHOUT_BODY:
            return _WITHOUT_BODY[(method, endpoint)](model)
        if endpoint == "vmm.ping":
            return Answer(
                200, {"version": "v48.0-husk-contract", "pid": os.getpid(), "features": ["kvm"]}
            )
        if endpoint == "vmm.shutdown":
            model.delete()
            model.on_event("vmm", "shutdown")
            self.shutdown.set()
            return Answer(200)
        return error(404, "Not Found")

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``path`` and answer until cancelled."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(str(path))
        listener.listen(16)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(self._connection, conn)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        with sock:
            conn = h11.Connection(h11.SERVER)
            fds: list[int] = []
            method = target = ""
            raw = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data, anc, _, _ = await sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
                    for level, kind, payload in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            got = array.array("i")
                            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                            fds += list(got)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    method, target = event.method.decode(), event.target.decode()
                elif isinstance(event, h11.Data):
                    raw += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            endpoint = target.removeprefix(API_ROOT) if target.startswith(API_ROOT) else target
            if endpoint in self.hang:
                await trio.sleep_forever()
            reply = self.answer(method, endpoint, bytes(raw), fds)
            if endpoint != "vm.add-net" or reply.status >= 300:
                for fd in fds:
                    os.close(fd)
            payload = b"" if reply.body is None else json.dumps(reply.body).encode()
            headers = [("Server", "Cloud Hypervisor API"), ("Content-Type", "application/json")]
            headers.append(("Content-Length", str(len(payload))))
            phrase = HTTPStatus(reply.status).phrase.encode()
            out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
            if payload:
                out += conn.send(h11.Data(data=payload))
            out += conn.send(h11.EndOfMessage())
            await _send_all(sock, out)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]
