"""containerd's way of forwarding a port — dial localhost in the pod's netns — reaches the pod.

A real network namespace with the shim's listener and NAT rule in it
(``shim.network.portforward``); a client in the netns dials ``127.0.0.1:<port>``
as containerd does, and the shim carries the connection to the "pod" address
— here a server on the host's loopback, standing for the VM behind the tap.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator

import pytest
import trio

from shim.network import portforward
from shim.network.netns import run_in_netns

pytestmark = [pytest.mark.integration]
if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="needs root (netns, iptables)"))


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hpf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield f"/var/run/netns/{name}"
    subprocess.run(["ip", "netns", "delete", name], check=True)


@pytest.fixture
def pod_server() -> Iterator[int]:
    """A server on the host's 127.0.0.1 that answers each line with it upper-cased."""
    server = socket.create_server(("127.0.0.1", 0))
    port: int = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(1024).upper())

    threading.Thread(target=answer, daemon=True).start()
    yield port
    server.close()


def _dial_in_netns(netns: str, port: int, payload: bytes) -> bytes:
    def inside() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: conn.recv(1024), b""))

    return run_in_netns(netns, inside)


def _through_the_forwarder(netns: str, port: int, payload: bytes) -> bytes:
    """What a client dialling ``127.0.0.1:<port>`` in the netns gets back while the
    shim forwards the netns's connections to the "pod" (the host's loopback)."""
    listener = portforward.open_listener(netns)

    async def main() -> bytes:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(portforward.serve, listener, "127.0.0.1")
            got = await trio.to_thread.run_sync(_dial_in_netns, netns, port, payload)
            nursery.cancel_scope.cancel()
        return got

    return trio.run(main)


def test_a_connection_to_localhost_in_the_netns_reaches_the_pod(
    netns: str, pod_server: int
) -> None:
    assert _through_the_forwarder(netns, pod_server, b"hello\n") == b"HELLO\n"


def test_a_port_nothing_listens_on_closes_the_connection(netns: str) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert _through_the_forwarder(netns, port, b"") == b""
