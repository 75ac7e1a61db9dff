"""A QMP client on trio: greeting, capabilities, commands by id, events, fds.

Modelled on QEMU's ``python/qemu/qmp``: the client owns one stream (a unix
socket in practice, a memory stream in tests) and one reader task. Commands
carry an ``id``; the reader hands each reply to the command that waits for it,
in whatever order replies come, and each event to the listeners that match it
(see ``qmp_events``). When the connection ends, for whatever reason, every
waiting command and listener wakes with a ``QmpError``.

The reader task belongs to the caller's nursery::

    client = QmpClient(stream)
    await client.negotiate()               # greeting + qmp_capabilities
    nursery.start_soon(client.run)         # the reader
    status = await client.execute("query-status")

or, when no nursery is around, ``async with open_qmp(stream) as client: ...``.
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from plugins.qemu.qmp_errors import (
    QmpCommandError,
    QmpConnectionLost,
    QmpError,
    QmpGreetingError,
    QmpProtocolError,
)
from plugins.qemu.qmp_events import EventListener, EventPredicate, QmpEvent

log = logging.getLogger(__name__)

_READ_SIZE = 65536


class _Pending:
    """A command waiting for its reply."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.done = trio.Event()
        self.reply: Mapping[str, Any] | None = None
        self.error: QmpError | None = None


class QmpClient:
    """One QMP connection: ``negotiate``, then ``run`` reads; ``execute`` sends commands."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._listeners: set[EventListener] = set()
        self._error: QmpError | None = None
        self._closed = trio.Event()
        self.greeting: Mapping[str, Any] = {}

    # --- life ---------------------------------------------------------------

    async def negotiate(self) -> None:
        """Read the greeting and enter command mode (``qmp_capabilities``).

        Raises ``QmpGreetingError`` or ``QmpConnectionLost``; on failure the
        stream is closed.
        """
        try:
            await self._negotiate()
        except QmpError as exc:
            self._fail(exc)
            await trio.aclose_forcefully(self._stream)
            raise

    async def run(self) -> None:
        """The reader: dispatch replies and events until the connection ends.

        The end of the connection is not an error of this task: it wakes every
        waiter with a ``QmpError`` and returns.
        """
        try:
            while True:
                self._dispatch(await self._read_message())
        except QmpError as exc:
            self._fail(exc)
        finally:
            self._fail(QmpConnectionLost("QMP connection closed"))
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close the connection; the reader returns and waiters wake."""
        self._fail(QmpConnectionLost("QMP connection closed by husk"))
        await trio.aclose_forcefully(self._stream)

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once the connection has ended."""
        await self._closed.wait()

    # --- commands -------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        ``fds`` travel with the command as SCM_RIGHTS (for ``getfd``/``add-fd``);
        that needs a socket stream. Raises ``QmpCommandError`` with QEMU's class
        and desc, or ``QmpConnectionLost`` if the connection ends first.
        """
        if self._error is not None:
            raise self._error
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        pending = _Pending(command)
        self._pending[msg_id] = pending
        try:
            await self._send(json.dumps(msg).encode() + b"\n", fds)
            await pending.done.wait()
        finally:
            self._pending.pop(msg_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return _result(command, pending.reply)

    # --- events ---------------------------------------------------------------

    @asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventListener]:
        """Receive the named events (all if none) for the duration of the block."""
        listener = EventListener(frozenset(names))
        if self._error is not None:
            listener.close(self._error)
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    async def wait_event(self, name: str, predicate: EventPredicate | None = None) -> QmpEvent:
        """The next ``name`` event matching ``predicate``, from now on.

        Only for events that cannot fire before this call: otherwise use
        ``listen`` around the command that triggers the event.
        """
        async with self.listen(name) as listener:
            return await listener.wait_for(predicate)

    # --- internals --------------------------------------------------------------

    async def _negotiate(self) -> None:
        greeting = await self._read_message()
        if "QMP" not in greeting or not isinstance(greeting["QMP"], dict):
            raise QmpGreetingError(f"expected a QMP greeting, got {_short(greeting)}")
        self.greeting = greeting["QMP"]
        msg_id = next(self._ids)
        await self._send(json.dumps({"execute": "qmp_capabilities", "id": msg_id}).encode() + b"\n")
        while True:
            reply = await self._read_message()
            if "event" in reply:
                self._dispatch(reply)
                continue
            if reply.get("id") != msg_id:
                raise QmpGreetingError(f"unexpected reply to qmp_capabilities: {_short(reply)}")
            if "error" in reply:
                err = reply["error"]
                raise QmpGreetingError(f"qmp_capabilities refused: {err.get('desc', err)}")
            return

    async def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            async with self._send_lock:
                if not fds:
                    await self._stream.send_all(data)
                    return
                if not isinstance(self._stream, trio.SocketStream):
                    raise QmpError("passing fds over QMP needs a unix socket connection")
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = await self._stream.socket.sendmsg([data], ancillary)
                if sent < len(data):
                    await self._stream.send_all(data[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._error or QmpConnectionLost(f"QMP connection lost: {exc}") from exc

    async def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                chunk = await self._stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._error or QmpConnectionLost(f"QMP connection lost: {exc}") from exc
            if not chunk:
                raise QmpConnectionLost("QMP connection closed by QEMU")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QmpProtocolError(f"QMP sent invalid JSON: {_short(line)}") from exc
        if not isinstance(msg, dict):
            raise QmpProtocolError(f"QMP sent a non-object: {_short(msg)}")
        return msg

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            event = QmpEvent.from_message(msg)
            for listener in list(self._listeners):
                if listener.accepts(event):
                    listener.put(event)
            return
        msg_id = msg.get("id")
        if msg_id is None:
            # Our commands always carry an id: QEMU could not parse one of them.
            raise QmpProtocolError(f"QMP reply without id: {_short(msg)}")
        pending = self._pending.get(msg_id) if isinstance(msg_id, int) else None
        if pending is None:
            log.debug("dropping QMP reply for a command no one waits for: %s", _short(msg))
            return
        pending.reply = msg
        pending.done.set()

    def _fail(self, error: QmpError) -> None:
        """Record the end of the connection and wake every waiter with ``error``."""
        if self._error is None:
            self._error = error
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = self._error
                pending.done.set()
        for listener in self._listeners:
            listener.close(self._error)
        self._closed.set()


@asynccontextmanager
async def open_qmp(stream: trio.abc.Stream) -> AsyncIterator[QmpClient]:
    """A negotiated client whose reader lives for the block, in its own nursery.

    An error raised in the block comes out as itself (e.g. ``QmpCommandError``),
    not wrapped in the nursery's ``ExceptionGroup``, so callers can catch it.
    """
    client = QmpClient(stream)
    await client.negotiate()
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        try:
            yield client
        except Exception as exc:
            error = exc
        finally:
            await client.aclose()
    if error is not None:
        raise error


async def connect_unix(path: str) -> trio.SocketStream:
    """Open a stream to QEMU's QMP unix socket."""
    return await trio.open_unix_socket(path)


def _result(command: str, reply: Mapping[str, Any]) -> Any:
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, dict):
            raise QmpProtocolError(f"malformed QMP error: {_short(reply)}")
        raise QmpCommandError(command, str(err.get("class", "?")), str(err.get("desc", "")))
    if "return" not in reply:
        raise QmpProtocolError(f"QMP reply has neither return nor error: {_short(reply)}")
    return reply["return"]


def _short(value: object, limit: int = 200) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
