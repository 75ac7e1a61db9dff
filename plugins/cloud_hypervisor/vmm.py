"""One ``cloud-hypervisor`` process: how it starts, is talked to, ends and is stopped.

``Vmm.spawn`` runs ``cloud-hypervisor --api-socket path=… --event-monitor
fd=…`` with the write end of the event pipe as its only extra fd;
``wait_api`` polls ``vmm.ping`` until the API answers (telling "never created
its socket" from "never answered" when the deadline passes); ``call`` makes
one request and turns a VMM that died under it into ``VmmExitedError`` with
its last words; ``wait`` returns when the process exits or the event monitor
reports the guest gone; ``shut_down`` asks the API (``vm.shutdown``,
``vm.delete``, ``vmm.shutdown``), then signals.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from plugins.cloud_hypervisor.api import ApiClient, ApiError, ApiUnreachableError
from plugins.cloud_hypervisor.events import Event, EventMonitor
from plugins.cloud_hypervisor.process import HelperProcess
from plugins.cloud_hypervisor.vmconfig import ChSettings, VmPaths
from shim.errors import DeadlineExceededError, HypervisorError

NAME = "cloud-hypervisor"
_POLL = 0.05

T = TypeVar("T")


class Vmm:
    """A running ``cloud-hypervisor``: its process, API client and event monitor."""

    def __init__(self, process: HelperProcess, api: ApiClient, events: EventMonitor) -> None:
        self.process = process
        self.api = api
        self.events = events
        #: Cloud Hypervisor's version, from ``vmm.ping``
        self.version = ""

    @classmethod
    async def spawn(cls, settings: ChSettings, paths: VmPaths) -> Vmm:
        """Start the VMM (stale sockets of an earlier run removed first)."""
        for stale in paths.sockets():
            stale.unlink(missing_ok=True)
        events = EventMonitor()
        argv = [
            settings.binary,
            "--api-socket",
            f"path={paths.api}",
            "--event-monitor",
            f"fd={events.write_fd}",
            "--seccomp",
            settings.seccomp,
        ]
        if settings.enable_debug:
            argv.append("-vv")
        try:
            process = await HelperProcess.spawn(
                argv, log=paths.log, name=NAME, key="path", pass_fds=[events.write_fd]
            )
        except BaseException:
            await events.aclose()
            raise
        events.close_writer()  # the VMM holds the only write end: EOF when it exits
        return cls(process, ApiClient(paths.api, settings.api_timeout), events)

    @property
    def pid(self) -> int:
        """The VMM's pid."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process.alive

    @property
    def lost(self) -> Event | None:
        """The event that ended the guest while the VMM lives on (None: none yet)."""
        return self.events.lost

    async def wait_api(self, deadline: float, timeout: float) -> None:
        """Poll until ``vmm.ping`` answers; the VMM may still be creating its socket."""
        appeared = False
        try:
            with trio.fail_at(deadline):
                while True:
                    if not self.process.alive:
                        raise self.process.exited_error()
                    try:
                        ping = await self.api.get("vmm.ping")
                    except ApiUnreachableError as exc:
                        appeared = appeared or not exc.absent
                        await trio.sleep(_POLL)
                        continue
                    self.version = str(ping.get("version", "")) if isinstance(ping, dict) else ""
                    return
        except trio.TooSlowError:
            path = self.api.path
            what = "answer on" if appeared or path.exists() else "create"
            raise DeadlineExceededError(
                f"{NAME} did not {what} its API socket {path} within {timeout:g} s; "
                f"killed it (see {self.process.log})"
            ) from None

    async def call(self, request: Callable[[ApiClient], Awaitable[T]]) -> T:
        """One API request; a VMM that died under it becomes ``VmmExitedError``."""
        try:
            return await request(self.api)
        except ApiUnreachableError as exc:
            if await self.process.wait_for(1.0):
                raise self.process.exited_error() from exc
            raise

    async def wait(self) -> int | None:
        """Return once the VM is gone: the process exited (its status), or the event
        monitor reported a guest panic or reboot while the VMM lives on (None)."""
        status: list[int] = []
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                status.append(await self.process.wait())
                nursery.cancel_scope.cancel()

            async def lost() -> None:
                if await self.events.wait_lost() is not None:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            nursery.start_soon(lost)
        return status[0] if status else None

    async def shut_down(self, step: float, vm_running: bool | None) -> None:
        """Ask the VMM to end (``vm_running`` None: it does not answer), then signal it.

        Each request gets ``step`` seconds; a VMM that misses one gets signals,
        not more requests.
        """
        if vm_running is not None:
            answered = await self._try("vm.shutdown", step) if vm_running else True
            if answered and await self._try("vm.delete", step):
                await self._try("vmm.shutdown", step)
        await self.process.wait_for(step)
        await self.process.terminate(step)
        self.process.signal_group(signal.SIGKILL)  # anything it left in its group

    async def _try(self, endpoint: str, timeout: float) -> bool:
        """PUT an endpoint; whether the VMM answered (an error status is an answer)."""
        try:
            await self.api.request("PUT", endpoint, timeout=timeout)
        except ApiError:
            return True
        except (HypervisorError, DeadlineExceededError):
            return False
        return True

    async def kill(self) -> None:
        """SIGKILL the VMM's group, reap it and close the event pipe."""
        await self.process.kill()
        await self.events.aclose()

    async def aclose(self) -> None:
        """Close the event pipe (the process is already gone or being killed)."""
        await self.events.aclose()
