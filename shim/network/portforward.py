"""containerd's port-forward, carried from the pod's netns into its VM.

containerd's CRI forwards a port (``kubectl port-forward``, ``crictl
port-forward``) by entering the pod's network namespace and dialling
``localhost:<port>`` there (``internal/cri/server/sandbox_portforward_linux.go``).
Under runc that is the pod's own loopback; under husk the pod's processes run
in the VM, whose loopback the netns does not share. So each pod with a network
gets, in its netns:

- a listener on ``127.0.0.1:<ephemeral>``, made on a thread inside the netns
  (the socket stays there), served by the shim;
- one NAT rule: TCP to ``127.0.0.1`` from the netns, except to that port, is
  redirected to it (``iptables -t nat -A OUTPUT ... -j REDIRECT``; it goes
  away with the netns).

Each connection it accepts names its original port (``SO_ORIGINAL_DST``); the
shim connects from the host to the pod's IP on that port (the path a
``hostPort`` or a Service takes into the VM) and copies bytes both ways until
either side closes. A port nothing in the VM listens on closes the connection
at once.
"""

from __future__ import annotations

import logging
import socket
import subprocess

import trio

from shim.network.errors import NetworkError
from shim.network.netns import run_in_netns

log = logging.getLogger("husk.network.portforward")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
LOOPBACK = "127.0.0.1"
_CHUNK = 65536


def nat_rule(port: int) -> list[str]:
    """The iptables arguments that send the netns's loopback TCP to ``port``."""
    return [
        "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-d", LOOPBACK,
        "!", "--dport", str(port), "-j", "REDIRECT", "--to-ports", str(port),
    ]  # fmt: skip


def open_listener(netns: str) -> socket.socket:
    """The netns's listener and its NAT rule (blocking: run on a worker thread)."""

    def inside() -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind((LOOPBACK, 0))
            listener.listen(64)
            # a child forked from this thread starts in the netns too
            proc = subprocess.run(
                ["iptables", "-w", *nat_rule(listener.getsockname()[1])],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            listener.close()
            raise NetworkError(f"port-forward in netns {netns}: iptables: {e}") from None
        if proc.returncode != 0:
            listener.close()
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise NetworkError(f"port-forward in netns {netns}: iptables: {reason}")
        return listener

    return run_in_netns(netns, inside)


def original_port(conn: socket.socket) -> int:
    """The port a redirected connection was made to (``SO_ORIGINAL_DST``)."""
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return int.from_bytes(raw[2:4], "big")


async def serve(listener: socket.socket, pod_ip: str) -> None:
    """Accept on ``listener`` and forward each connection to ``pod_ip``; until cancelled."""
    sock = trio.socket.from_stdlib_socket(listener)
    with sock:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_forward, conn, pod_ip)


async def _forward(conn: trio.socket.SocketType, pod_ip: str) -> None:
    stream = trio.SocketStream(conn)
    async with stream:
        port = original_port(conn)  # type: ignore[arg-type]
        try:
            upstream = await trio.open_tcp_stream(pod_ip, port)
        except OSError as e:
            log.debug("port-forward to %s:%d: %s", pod_ip, port, e)
            return
        async with upstream, trio.open_nursery() as pair:
            pair.start_soon(_copy, stream, upstream, pair.cancel_scope)
            pair.start_soon(_copy, upstream, stream, pair.cancel_scope)


async def _copy(source: trio.SocketStream, sink: trio.SocketStream, pair: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(_CHUNK):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pair.cancel()
