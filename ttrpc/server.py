"""The ttrpc server: registered services served on any trio stream.

    server = Server()
    server.register(task_pb2.DESCRIPTOR.services_by_name["Task"], TaskService())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_unix, "/run/husk/shim.sock")
        ...
        await server.shutdown()        # stop accepting, finish calls, close

``serve_stream`` serves one already-connected stream (vsock, virtio-serial,
a socket after a handshake); the server knows nothing of transports. A
listener may be given an ``admit`` check: each accepted stream is served only
once it returns True (in the stream's own task, so a slow peer holds up no
other), and is closed unserved otherwise.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable

import trio
from google.protobuf.descriptor import ServiceDescriptor

from ttrpc.frame import MAX_MESSAGE_SIZE
from ttrpc.server_connection import ServerConnection
from ttrpc.service import MethodSpec, ServiceRegistry

log = logging.getLogger("husk.ttrpc")

DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

#: decides whether an accepted stream is served (e.g. a handshake); bounds its own time
Admit = Callable[[trio.abc.Stream], Awaitable[bool]]


class Server:
    """Serves registered ttrpc services on any number of streams and listeners."""

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.registry = ServiceRegistry()
        self._max_message_size = max_message_size
        self._shutdown_timeout = shutdown_timeout
        self._connections: set[ServerConnection] = set()
        self._accept_scopes: set[trio.CancelScope] = set()
        #: streams still being admitted: ``shutdown`` cancels them
        self._admit_scopes: set[trio.CancelScope] = set()
        self._connection_gone = trio.lowlevel.ParkingLot()
        self._closing = False

    def register(self, descriptor: ServiceDescriptor, implementation: object) -> list[str]:
        """Serve ``descriptor``'s RPCs with ``implementation``'s methods of the same names.

        See :mod:`ttrpc.service` for the handler shapes. Returns the
        registered method names.
        """
        return self.registry.register(descriptor, implementation)

    def register_method(self, spec: MethodSpec) -> None:
        """Serve one method described by hand (tests, proxies)."""
        self.registry.add(spec)

    @property
    def connection_count(self) -> int:
        """Connections currently being served."""
        return len(self._connections)

    async def serve_stream(self, stream: trio.abc.Stream, admit: Admit | None = None) -> None:
        """Serve one connected stream until it closes; closes the stream.

        With ``admit``, the stream is served only if ``admit(stream)`` returns True.
        """
        if admit is not None and not await self._admit(stream, admit):
            await trio.aclose_forcefully(stream)
            return
        if self._closing:
            await trio.aclose_forcefully(stream)
            return
        connection = ServerConnection(self.registry, stream, self._max_message_size)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            self._connection_gone.unpark_all()

    async def _admit(self, stream: trio.abc.Stream, admit: Admit) -> bool:
        with trio.CancelScope() as scope:
            self._admit_scopes.add(scope)
            if self._closing:
                scope.cancel()
            try:
                return await admit(stream)
            finally:
                self._admit_scopes.discard(scope)
        return False

    async def serve_listener(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        admit: Admit | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until ``shutdown()``; closes the listener.

        Returns once every accepted connection is finished.
        """
        await self._serve_listener(listener, task_status.started, admit)

    async def _serve_listener(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        started: Callable[[], None],
        admit: Admit | None = None,
    ) -> None:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as accept_scope:
                self._accept_scopes.add(accept_scope)
                try:
                    async with listener:
                        if self._closing:
                            accept_scope.cancel()
                        started()
                        await self._accept_loop(listener, nursery, admit)
                finally:
                    self._accept_scopes.discard(accept_scope)

    async def _accept_loop(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        nursery: trio.Nursery,
        admit: Admit | None,
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("ttrpc: accept failed, retrying: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(functools.partial(self.serve_stream, stream, admit))

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        admit: Admit | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a unix socket at ``path`` and serve it until ``shutdown()``.

        A stale socket file at ``path`` is replaced; the file is removed on exit.
        ``task_status.started`` receives the path. The socket is bound under a
        temporary name and renamed into place once it listens, so a client that
        sees the file can connect at once (never ECONNREFUSED in between).
        """
        path = os.fspath(path)
        _remove_stale_socket(path)
        staging = f"{path}.{os.getpid()}.tmp"
        if len(os.fsencode(staging)) > _SUN_PATH_MAX:
            staging = path  # no room for a longer name: bind in place
        _remove_stale_socket(staging)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(staging)
            sock.listen(128)
            if staging != path:
                os.replace(staging, path)
        except BaseException:
            sock.close()
            _remove_stale_socket(staging)
            raise
        try:
            listener = trio.SocketListener(sock)
            await self._serve_listener(listener, lambda: task_status.started(path), admit)
        finally:
            _remove_stale_socket(path)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let running calls finish, then close every connection.

        Calls still running after ``timeout`` seconds (default: the server's
        ``shutdown_timeout``) are cancelled.
        """
        self._closing = True
        for scope in list(self._accept_scopes) + list(self._admit_scopes):
            scope.cancel()
        for connection in list(self._connections):
            connection.drain()
        with trio.move_on_after(self._shutdown_timeout if timeout is None else timeout):
            while self._connections:
                await self._connection_gone.park()
        if self._connections:
            log.warning(
                "ttrpc: shutdown timed out; cancelling %d connection(s)", len(self._connections)
            )
            for connection in list(self._connections):
                connection.abort()
            while self._connections:
                await self._connection_gone.park()


#: sun_path holds 108 bytes, NUL included
_SUN_PATH_MAX = 107


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
