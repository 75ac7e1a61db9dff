"""A hostile agent: what it answers is untrusted input, and the shim holds.

The shim's real task service and sandbox run against the fake agent of
``test_task_service``, with a tampering proxy on the agent's channel: it
rewrites the answers to the calls a test names (bytes that do not decode, a
wrong message type, a frame past the size limit), injects frames on streams
nobody opened, or answers GetOOMEvent itself. Each test checks that the one
call fails (or the one event is dropped), the other containers of the pod
keep working, and what the shim logs or publishes stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent_proto import agent_pb2, events_pb2, status_pb2, task_pb2, ttrpc_pb2
from shim.containerd import serve
from shim.containerd.events import topic_of
from shim.errors import HuskError
from shim.lograte import RateLimit
from shim.sandbox.sandbox import Sandbox
from tests.unit.test_task_service import Harness
from ttrpc import RpcError
from ttrpc.codes import Code
from ttrpc.frame import MAX_MESSAGE_SIZE, Frame, FrameReader, MessageType, encode_header
from ttrpc.status import status_from_exception

REQUEST_TIMEOUT = 1.0
#: what to send instead of the server's answer to a method: raw bytes on the wire
Tamper = Callable[[Frame], bytes]


def frame(stream_id: int, message_type: int, payload: bytes) -> bytes:
    return encode_header(len(payload), stream_id, message_type) + payload


def garbage(original: Frame) -> bytes:
    return frame(original.stream_id, MessageType.RESPONSE, b"\xff\xff\xff\xff\x0f")


def wrong_type(original: Frame) -> bytes:
    return frame(original.stream_id, MessageType.DATA, original.payload)


def oversize(original: Frame) -> bytes:
    length = MAX_MESSAGE_SIZE + 1
    return encode_header(length, original.stream_id, MessageType.RESPONSE) + bytes(length)


def silence(original: Frame) -> bytes:
    return b""


def strays_then(original: Frame) -> bytes:
    stray = b"".join(frame(99_999 + 2 * i, MessageType.RESPONSE, b"") for i in range(5000))
    return stray + frame(original.stream_id, original.message_type, original.payload)


class TamperingAgent(Harness):
    """The harness, with a proxy on the agent channel that rewrites chosen answers."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        super().__init__(tmp, nursery)
        self.tamper: dict[str, Tamper] = {}
        self.oom_answers: list[str] = []

    def make_sandbox(
        self, sandbox_id: str, netns: str | None, annotations: Mapping[str, Any]
    ) -> Sandbox:
        sandbox = super().make_sandbox(sandbox_id, netns, annotations)
        sandbox.request_timeout = REQUEST_TIMEOUT
        return sandbox

    async def dial(self, endpoint: object, timeout: float) -> trio.abc.Stream:
        shim_side, proxy_front = trio.testing.memory_stream_pair()
        proxy_back, server_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.serve_stream, server_side)
        methods: dict[int, str] = {}
        self.nursery.start_soon(self._requests, proxy_front, proxy_back, methods)
        self.nursery.start_soon(self._answers, proxy_back, proxy_front, methods)
        return shim_side

    async def _requests(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, methods: dict[int, str]
    ) -> None:
        reader = FrameReader(source)
        while (f := await reader.receive()) is not None:
            if f.message_type == MessageType.REQUEST:
                request = ttrpc_pb2.Request.FromString(f.payload)
                methods[f.stream_id] = request.method
                if request.method == "GetOOMEvent" and self.oom_answers:
                    await self._answer_oom(source, f)
                    continue
            await sink.send_all(encode_header(len(f.payload), *f[:3]) + f.payload)

    async def _answer_oom(self, shim: trio.abc.Stream, f: Frame) -> None:
        name = self.oom_answers.pop(0) if len(self.oom_answers) > 1 else self.oom_answers[0]
        body = agent_pb2.OOMEvent(container_id=name).SerializeToString()
        response = ttrpc_pb2.Response(payload=body).SerializeToString()
        await shim.send_all(frame(f.stream_id, MessageType.RESPONSE, response))

    async def _answers(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, methods: dict[int, str]
    ) -> None:
        reader = FrameReader(source)
        while (f := await reader.receive()) is not None:
            tamper = self.tamper.get(methods.get(f.stream_id, ""))
            data = tamper(f) if tamper else encode_header(len(f.payload), *f[:3]) + f.payload
            await sink.send_all(data)


async def start_pod(h: Harness) -> None:
    """Two containers of one pod, both running."""
    await h.service.Create(h.create_request("app", ["sleep"]), None)
    await h.service.Start(task_pb2.StartRequest(id="app"), None)
    await h.service.Create(h.create_request("side", ["sleep"], pod="app"), None)
    await h.service.Start(task_pb2.StartRequest(id="side"), None)


async def pod_still_works(h: Harness) -> None:
    """The shim still answers containerd, and the other container is still there."""
    state = await h.service.State(task_pb2.StateRequest(id="app"), None)
    assert state.status == 2  # RUNNING
    await h.service.Kill(task_pb2.KillRequest(id="app", signal=9), None)
    waited = await h.service.Wait(task_pb2.WaitRequest(id="app"), None)
    assert waited.exit_status == 137


@pytest.mark.parametrize("tamper", [garbage, wrong_type, oversize], ids=lambda t: t.__name__)
async def test_a_broken_answer_fails_that_call_only(tmp_path: Path, tamper: Tamper) -> None:
    async with trio.open_nursery() as nursery:
        h = TamperingAgent(tmp_path, nursery)
        await start_pod(h)
        h.tamper["PauseContainer"] = tamper
        with pytest.raises((RpcError, HuskError)):
            await h.service.Pause(task_pb2.PauseRequest(id="side"), None)
        del h.tamper["PauseContainer"]
        await pod_still_works(h)
        await h.service.teardown()
        nursery.cancel_scope.cancel()


class Collect(logging.Handler):
    """The records that pass the shim's log filter."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.addFilter(RateLimit(burst=10, interval=60))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_flood_of_frames_for_unknown_streams_reaches_the_log_a_few_times(
    tmp_path: Path,
) -> None:
    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        await _flood_of_strays(tmp_path)
    finally:
        logging.getLogger().removeHandler(collect)
    strays = [r for r in collect.records if "unknown stream" in r.getMessage()]
    assert 0 < len(strays) <= 10


async def _flood_of_strays(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = TamperingAgent(tmp_path, nursery)
        await start_pod(h)
        await h.service.Pause(task_pb2.PauseRequest(id="side"), None)  # a call that works
        h.tamper["PauseContainer"] = strays_then
        await h.service.Resume(task_pb2.ResumeRequest(id="side"), None)
        await h.service.Pause(task_pb2.PauseRequest(id="side"), None)
        await pod_still_works(h)
        await h.service.teardown()
        nursery.cancel_scope.cancel()


async def test_an_oom_event_naming_a_container_of_another_sandbox_is_not_published(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        h = TamperingAgent(tmp_path, nursery)
        h.oom_answers = ["someone-elses-container", "side", "side"]
        await start_pod(h)
        await trio.sleep(0.5)
        ooms = [e for e in h.publisher.events if topic_of(e) == "/tasks/oom"]
        assert ooms, "an OOM of the sandbox's own container is published"
        assert {e.container_id for e in ooms if isinstance(e, events_pb2.TaskOOM)} == {"side"}
        await h.service.teardown()
        nursery.cancel_scope.cancel()


async def test_a_flood_of_oom_events_reaches_containerd_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        h = TamperingAgent(tmp_path, nursery)
        h.oom_answers = ["app"]  # answered at once, every time, forever
        await start_pod(h)
        await trio.sleep(2.0)
        ooms = [e for e in h.publisher.events if topic_of(e) == "/tasks/oom"]
        assert 1 <= len(ooms) <= 3  # at most one a second for one container
        await pod_still_works(h)
        await h.service.teardown()
        nursery.cancel_scope.cancel()


async def test_an_agent_that_never_answers_fails_the_call_at_its_deadline(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        h = TamperingAgent(tmp_path, nursery)
        await start_pod(h)
        h.tamper["PauseContainer"] = silence
        with pytest.raises(RpcError) as info:
            await h.service.Pause(task_pb2.PauseRequest(id="side"), None)
        assert info.value.code.name == "DEADLINE_EXCEEDED"
        del h.tamper["PauseContainer"]
        await pod_still_works(h)
        await h.service.teardown()
        nursery.cancel_scope.cancel()


def test_the_serving_shims_log_is_rate_limited(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        serve.setup_logging(str(tmp_path), logging.INFO)
        added = [h for h in root.handlers if h not in before]
        assert added and any(isinstance(f, RateLimit) for f in added[0].filters)
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)


def huge_error(original: Frame) -> bytes:
    """An error status whose message fills the largest frame (~4 MiB)."""
    message = "A" * (MAX_MESSAGE_SIZE - 64)
    status = status_pb2.Status(code=Code.INTERNAL, message=message)
    response = ttrpc_pb2.Response(status=status).SerializeToString()
    assert len(response) <= MAX_MESSAGE_SIZE
    return frame(original.stream_id, MessageType.RESPONSE, response)


async def test_a_huge_error_from_the_agent_reaches_logs_and_containerd_cut_to_a_few_kib(
    tmp_path: Path,
) -> None:
    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        async with trio.open_nursery() as nursery:
            h = TamperingAgent(tmp_path, nursery)
            await start_pod(h)
            h.tamper["PauseContainer"] = huge_error
            with pytest.raises(RpcError) as info:
                await h.service.Pause(task_pb2.PauseRequest(id="side"), None)
            del h.tamper["PauseContainer"]
            await pod_still_works(h)
            await h.service.teardown()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger().removeHandler(collect)
    sent = status_from_exception(info.value)  # what containerd gets
    for message in (str(info.value), sent.message):
        assert len(message.encode()) <= 5 * 1024
        assert message.startswith("AAAA") and message.endswith(" bytes cut]")
    assert all(len(r.getMessage()) <= 8 * 1024 for r in collect.records)
