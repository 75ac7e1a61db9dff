"""A fake ``cloud-hypervisor`` binary: the contract server on ``--api-socket``.

Run as ``python fake_ch.py --api-socket path=P --event-monitor fd=N ...`` (the
tests write a small executable wrapper that the driver runs as its ``path``).
It writes events to the monitor fd as Cloud Hypervisor does (pretty JSON, a
blank line after each), appends every request and every contract violation to
``$FAKE_CH_RECORD`` (JSON lines), and exits after ``vmm.shutdown``.

``$FAKE_CH_MODE`` picks a misbehaviour: ``ok``; ``exit`` (fails at once, with
a message on stderr); ``no-socket`` (never creates its API socket); ``mute``
(accepts connections, never answers); ``die-on-boot`` (exits on ``vm.boot``);
``ignore-term`` (survives SIGTERM); ``hang:<endpoint>`` (that endpoint never
answers). ``$FAKE_CH_EJECT_POLLS`` and ``$FAKE_CH_BUSY_RESIZES`` tune the model.
SIGUSR1 makes the "guest" panic: a ``guest panic`` event, then ``vm rebooting``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from tests.unit.cloud_hypervisor.server import ContractServer, Request, VmmModel  # noqa: E402


def option(name: str) -> dict[str, str]:
    """``--name k=v,k=v`` as a dict."""
    value = sys.argv[sys.argv.index(name) + 1]
    return dict(part.split("=", 1) for part in value.split(","))


class Monitor:
    """The event monitor's fd, written as Cloud Hypervisor writes it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = time.monotonic()

    def __call__(self, source: str, event: str) -> None:
        elapsed = time.monotonic() - self.start
        record = {
            "timestamp": {"secs": int(elapsed), "nanos": int(elapsed % 1 * 1e9)},
            "source": source,
            "event": event,
            "properties": None,
        }
        # a full pipe drops events, as Cloud Hypervisor's non-blocking writes do
        with contextlib.suppress(OSError):
            os.write(self.fd, json.dumps(record, indent=2).encode() + b"\n\n")


def record(path: str | None, line: dict[str, object]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


async def main() -> None:
    mode = os.environ.get("FAKE_CH_MODE", "ok")
    recording = os.environ.get("FAKE_CH_RECORD")
    if mode == "exit":
        sys.stderr.write("cloud-hypervisor: starting\n")
        sys.stderr.write("Error booting VM: Failed to open /dev/kvm: Permission denied\n")
        sys.exit(1)
    api = Path(option("--api-socket")["path"])
    monitor = Monitor(int(option("--event-monitor")["fd"]))
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(recording, {"argv": sys.argv[1:]})
    monitor("vmm", "starting")
    if mode == "no-socket":
        await trio.sleep_forever()
    if mode == "mute":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(api))
        sock.listen(16)
        await trio.sleep_forever()
    model = VmmModel(
        eject_polls=int(os.environ.get("FAKE_CH_EJECT_POLLS", "1")),
        busy_resizes=int(os.environ.get("FAKE_CH_BUSY_RESIZES", "0")),
        on_event=monitor,
    )
    server = ContractServer(model)
    if mode.startswith("hang:"):
        server.hang.add(mode.split(":", 1)[1])

    def on_request(request: Request) -> None:
        record(
            recording,
            {
                "request": [
                    request.method,
                    request.endpoint,
                    request.body,
                    request.fds,
                    request.status,
                ]
            },
        )
        for violation in server.violations:
            record(recording, {"violation": violation})
        server.violations.clear()
        if mode == "die-on-boot" and request.endpoint == "vm.boot":
            os._exit(3)

    server.on_request = on_request
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, api)
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:

            async def panics() -> None:
                async for _ in signals:
                    monitor("guest", "panic")
                    monitor("vm", "rebooting")

            nursery.start_soon(panics)
            await server.shutdown.wait()
            await trio.sleep(0.05)  # the answer is on its way out
            nursery.cancel_scope.cancel()
    api.unlink(missing_ok=True)


if __name__ == "__main__":
    trio.run(main)
