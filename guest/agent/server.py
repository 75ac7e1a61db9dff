"""The agent's main loop: reaper, ttrpc server, channels, and the end of the sandbox.

    reaper ─ SIGCHLD ─▶ ExitWatch ◀─ Process ◀─ Container ◀─ Sandbox ◀─ AgentService
                                                                         │
    channel (vsock | virtio-serial | unix) ─▶ ttrpc Server ─────────┘

The agent stops when DestroySandbox has run or on SIGTERM/SIGINT (after
removing every container); then the power-off action decides what happens to
the machine (:mod:`guest.agent.power`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence

import trio

from agent_proto import agent_pb2, health_pb2
from common import channel_auth
from guest.agent import command, debug_console, logs, power, system
from guest.agent.auth import Gate
from guest.agent.channel import ListenAddress, serve
from guest.agent.config import AgentConfig
from guest.agent.health import HealthService
from guest.agent.network import Network
from guest.agent.reaper import Reaper, become_subreaper
from guest.agent.sandbox import Sandbox
from guest.agent.service import AgentService
from ttrpc.server import Server

log = logging.getLogger("husk.agent")

SHUTDOWN_TIMEOUT = 2.0


def build_server(service: AgentService) -> Server:
    """A ttrpc server with AgentService and Health registered."""
    server = Server()
    server.register(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], service)
    server.register(health_pb2.DESCRIPTOR.services_by_name["Health"], HealthService())
    return server


async def _stop_on_signal(service: AgentService, stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s: removing containers and stopping", signal.Signals(signum).name)
            with trio.move_on_after(30):
                await service.sandbox.destroy()
            stop.set()
            return


async def _stop_when_destroyed(service: AgentService, stop: trio.Event) -> None:
    await service.destroyed.wait()
    stop.set()


async def run(config: AgentConfig, addresses: Sequence[ListenAddress], on_destroy: str) -> None:
    """Serve until the sandbox is destroyed or a signal asks to stop, then finish."""
    action = power.resolve(on_destroy)
    if not become_subreaper():
        log.warning("cannot become a child subreaper: container exits may be missed")
    reaper = Reaper()
    service = AgentService(Sandbox(config, reaper), Network())
    server = build_server(service)
    stop = trio.Event()
    gate = Gate(config.secret_file, channel_auth.AGENT)
    if any(a.kind != "serial" for a in addresses):
        gate.check()
    if not config.host_mode:
        system.protect_from_oom_killer()
        command.reset_children_oom_score_adj(0)
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        nursery.start_soon(service.sandbox.oom.run)
        served = 0
        for address in addresses:
            try:
                await nursery.start(serve, server, address, gate)
            except OSError as exc:
                # e.g. /dev/vsock without a transport: the other channel may still work.
                log.error("cannot listen on %s: %s", address, exc)
                continue
            served += 1
            log.info("serving on %s", address)
        if not served:
            raise OSError(f"the agent could not listen on any of {', '.join(map(str, addresses))}")
        if not config.host_mode and debug_console.enabled(logs.read_cmdline()):
            console_gate = Gate(config.secret_file, channel_auth.DEBUG_CONSOLE)
            nursery.start_soon(debug_console.serve, reaper, console_gate)
        nursery.start_soon(_stop_on_signal, service, stop)
        nursery.start_soon(_stop_when_destroyed, service, stop)
        await stop.wait()
        await server.shutdown(SHUTDOWN_TIMEOUT)
        nursery.cancel_scope.cancel()
    power.finish(action)
