"""The 10-byte header, the buffered frame reader and the single writer."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ttrpc import Code, ConnectionClosed, FrameTooLarge, MessageTooLarge, TruncatedFrame
from ttrpc.frame import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Flags,
    Frame,
    FrameHeader,
    FrameReader,
    MessageType,
    decode_header,
    encode_header,
)
from ttrpc.writer import FrameWriter


def test_header_encodes_big_endian_fields_in_wire_order() -> None:
    header = encode_header(
        0x01020304, 0x0A0B0C0D, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA
    )
    assert header == bytes([1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D, 3, 5])
    assert len(header) == HEADER_SIZE


def test_header_decodes_what_it_encodes() -> None:
    header = encode_header(17, 7, MessageType.REQUEST, Flags.REMOTE_OPEN)
    assert decode_header(b"xx" + header, offset=2) == FrameHeader(17, 7, 1, 2)


def test_wire_constants_match_containerd() -> None:
    assert MAX_MESSAGE_SIZE == 4 * 1024 * 1024
    assert (MessageType.REQUEST, MessageType.RESPONSE, MessageType.DATA) == (1, 2, 3)
    assert (Flags.REMOTE_CLOSED, Flags.REMOTE_OPEN, Flags.NO_DATA) == (1, 2, 4)


def _frame_bytes(stream_id: int, payload: bytes, message_type: int = 1, flags: int = 0) -> bytes:
    return encode_header(len(payload), stream_id, message_type, flags) + payload


async def _reader_over(data: bytes, chunk: int | None = None) -> FrameReader:
    send, receive = trio.testing.memory_stream_one_way_pair()
    if chunk is None:
        await send.send_all(data)
    else:
        for start in range(0, len(data), chunk):
            await send.send_all(data[start : start + chunk])
    await send.aclose()
    return FrameReader(receive)


async def test_reader_cuts_several_frames_out_of_one_chunk() -> None:
    reader = await _reader_over(
        _frame_bytes(1, b"one") + _frame_bytes(3, b"") + _frame_bytes(5, b"three")
    )
    assert await reader.receive() == Frame(1, 1, 0, b"one")
    assert await reader.receive() == Frame(3, 1, 0, b"")
    assert await reader.receive() == Frame(5, 1, 0, b"three")
    assert await reader.receive() is None


async def test_reader_reports_how_much_is_buffered_between_frames() -> None:
    second = _frame_bytes(3, b"two")
    reader = await _reader_over(_frame_bytes(1, b"one") + second)
    assert reader.buffered == 0
    await reader.receive()
    assert reader.buffered == len(second)  # the next frame is already here
    await reader.receive()
    assert reader.buffered == 0


async def test_reader_joins_a_frame_split_byte_by_byte() -> None:
    reader = await _reader_over(_frame_bytes(9, b"payload", 2, 1), chunk=1)
    assert await reader.receive() == Frame(9, 2, 1, b"payload")
    assert await reader.receive() is None


async def test_reader_reports_truncated_header() -> None:
    reader = await _reader_over(_frame_bytes(1, b"abc")[:6])
    with pytest.raises(TruncatedFrame):
        await reader.receive()


async def test_reader_reports_truncated_payload() -> None:
    reader = await _reader_over(_frame_bytes(1, b"abcdef")[:-2])
    with pytest.raises(TruncatedFrame):
        await reader.receive()


async def test_reader_skips_an_oversize_frame_and_reads_the_next() -> None:
    oversize = encode_header(40, 7, 1, 0) + b"z" * 40
    reader = FrameReader(await _stream_of(oversize + _frame_bytes(9, b"next")), max_size=32)
    with pytest.raises(FrameTooLarge) as raised:
        await reader.receive()
    assert (raised.value.stream_id, raised.value.length, raised.value.limit) == (7, 40, 32)
    assert await reader.receive() == Frame(9, 1, 0, b"next")


async def _stream_of(data: bytes) -> trio.abc.ReceiveStream:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(data)
    await send.aclose()
    return receive


async def test_writer_coalesces_queued_frames_into_one_write() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    writes: list[int] = []
    original = send.send_all

    async def counting_send_all(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await original(data)

    send.send_all = counting_send_all  # type: ignore[method-assign]
    writer = FrameWriter(send)
    for stream_id in (1, 3, 5):
        writer.send_nowait(stream_id, MessageType.REQUEST, 0, b"abc")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()
        writer.close("done")
    assert writes == [3 * (HEADER_SIZE + 3)]
    reader = FrameReader(receive)
    assert [(await reader.receive()).stream_id for _ in range(3)] == [1, 3, 5]  # type: ignore[union-attr]


def test_writer_refuses_an_oversize_message_with_resource_exhausted() -> None:
    send, _ = trio.testing.memory_stream_one_way_pair()
    writer = FrameWriter(send, max_size=8)
    with pytest.raises(MessageTooLarge) as raised:
        writer.send_nowait(1, MessageType.REQUEST, 0, b"123456789")
    assert raised.value.code is Code.RESOURCE_EXHAUSTED


def test_closed_writer_raises_connection_closed_with_reason() -> None:
    send, _ = trio.testing.memory_stream_one_way_pair()
    writer = FrameWriter(send)
    writer.close("peer went away")
    with pytest.raises(ConnectionClosed, match="peer went away"):
        writer.send_nowait(1, MessageType.REQUEST, 0, b"")
