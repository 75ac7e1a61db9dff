"""Task events to containerd, in the order they happen.

containerd 1.6 and 1.7 give a shim its ttrpc address in ``TTRPC_ADDRESS``; the
shim calls ``containerd.services.events.ttrpc.v1.Events/Forward`` there with an
``Envelope`` (timestamp, namespace, topic, the event as an ``Any`` whose type
URL is the message's full name, e.g. ``containerd.events.TaskExit``). The
``-publish-binary`` path is the older route (``containerd publish``); husk
keeps it only as the thing it names, not as a channel.

One sender task drains an unbounded queue, so ``publish`` never blocks the
caller and events reach containerd in the order they were published.
"""

from __future__ import annotations

import logging
import math
import time

import trio
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from agent_proto import events_pb2, events_ttrpc_pb2
from ttrpc import Client, ConnectionClosed, RpcError

log = logging.getLogger("husk.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
RETRIES = 3

TOPICS: dict[type[Message], str] = {
    events_pb2.TaskCreate: "/tasks/create",
    events_pb2.TaskStart: "/tasks/start",
    events_pb2.TaskDelete: "/tasks/delete",
    events_pb2.TaskExit: "/tasks/exit",
    events_pb2.TaskOOM: "/tasks/oom",
    events_pb2.TaskExecAdded: "/tasks/exec-added",
    events_pb2.TaskExecStarted: "/tasks/exec-started",
    events_pb2.TaskPaused: "/tasks/paused",
    events_pb2.TaskResumed: "/tasks/resumed",
    events_pb2.TaskCheckpointed: "/tasks/checkpointed",
}


def topic_of(event: Message) -> str:
    """The containerd topic of a task event."""
    return TOPICS[type(event)]


def envelope(
    namespace: str, event: Message, when: float | None = None
) -> events_ttrpc_pb2.Envelope:
    """Wrap ``event`` the way containerd's ``Forward`` expects it."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() if when is None else when) * 1e9))
    packed = any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
    return events_ttrpc_pb2.Envelope(
        timestamp=stamp, namespace=namespace, topic=topic_of(event), event=packed
    )


class Publisher:
    """What the task service publishes to; a fake in tests records the events."""

    def publish(self, event: Message) -> None:
        """Queue ``event`` for containerd; never blocks."""
        raise NotImplementedError

    async def run(self) -> None:
        """Deliver queued events until cancelled."""

    async def drain(self, timeout: float) -> None:
        """Wait until every queued event is delivered (or ``timeout`` passes)."""


class RecordingPublisher(Publisher):
    """Keeps events in a list (tests, and shims started without TTRPC_ADDRESS)."""

    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> None:
        log.debug("event %s: %s", topic_of(event), event)
        self.events.append(event)


class TtrpcPublisher(Publisher):
    """Forwards events to containerd's ttrpc address, one connection, in order."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._send, self._receive = trio.open_memory_channel[events_ttrpc_pb2.Envelope](math.inf)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    def publish(self, event: Message) -> None:
        log.debug("event %s: %s", topic_of(event), str(event).replace("\n", " "))
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._send.send_nowait(envelope(self.namespace, event))

    async def drain(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._idle.wait()

    async def run(self) -> None:
        while True:
            stream = await self._connect()
            async with Client.open(stream) as client:
                await self._forward_all(client)

    async def _connect(self) -> trio.abc.Stream:
        while True:
            try:
                return await trio.open_unix_socket(self.address)
            except OSError as e:
                log.warning("cannot reach containerd at %s: %s; retrying", self.address, e)
                await trio.sleep(1.0)

    async def _forward_all(self, client: Client) -> None:
        """Send queued envelopes until the connection breaks."""
        async for item in self._receive:
            for attempt in range(RETRIES):
                try:
                    await client.call(
                        EVENTS_SERVICE,
                        "Forward",
                        events_ttrpc_pb2.ForwardRequest(envelope=item),
                        empty_pb2.Empty,
                        timeout=FORWARD_TIMEOUT,
                    )
                    break
                except ConnectionClosed:
                    self._requeue(item)
                    return
                except RpcError as e:
                    log.warning("publishing %s (try %d): %s", item.topic, attempt + 1, e)
            self._done()

    def _requeue(self, item: events_ttrpc_pb2.Envelope) -> None:
        # Re-queue the failed event ahead of the rest, keeping their order.
        rest = [item]
        while True:
            try:
                rest.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        for envelope_ in rest:
            self._send.send_nowait(envelope_)

    def _done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()
