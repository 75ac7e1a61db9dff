"""The hand-coded envelopes agree byte for byte with the generated protobuf classes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_proto import status_pb2, ttrpc_pb2
from ttrpc.envelope import encode_ok_response, encode_request, ok_response_payload

_text = st.one_of(st.text(max_size=40), st.sampled_from(["", "husk.test.Echo", "Echo", "é☃"]))
_payload = st.one_of(st.binary(max_size=40), st.binary(min_size=120, max_size=300))
_timeout = st.one_of(st.just(0), st.integers(1, 2**63 - 1), st.sampled_from([1, 127, 128, 10**9]))
_metadata = st.lists(st.tuples(_text, _text), max_size=4)


def _generated(
    service: str, method: str, payload: bytes, timeout: int, metadata: list[tuple[str, str]]
) -> bytes:
    request = ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout
    )
    for key, value in metadata:
        request.metadata.add(key=key, value=value)
    return request.SerializeToString()


@given(_text, _text, _payload, _timeout, _metadata)
def test_request_bytes_match_protobuf(
    service: str, method: str, payload: bytes, timeout: int, metadata: list[tuple[str, str]]
) -> None:
    expected = _generated(service, method, payload, timeout, metadata)
    assert encode_request(service, method, payload, timeout, metadata) == expected
    # the second call of a method reuses its cached encoded names
    assert encode_request(service, method, payload, timeout, metadata) == expected
    assert encode_request(service, method, payload) == _generated(service, method, payload, 0, [])


@pytest.mark.parametrize(
    ("service", "timeout", "metadata"),
    [("\ud800", 0, []), ("s", 2**63, []), ("s", -1, []), ("s", 0, [("k", "\udfff")])],
)
def test_request_refusals_and_odd_values_match_protobuf(
    service: str, timeout: int, metadata: list[tuple[str, str]]
) -> None:
    try:
        expected: bytes | type[BaseException] = _generated(service, "m", b"", timeout, metadata)
    except Exception as exc:  # whatever protobuf raises, the fast path raises too
        expected = type(exc)
    if isinstance(expected, bytes):
        assert encode_request(service, "m", b"", timeout, metadata) == expected
    else:
        with pytest.raises(expected):
            encode_request(service, "m", b"", timeout, metadata)


@given(_payload)
def test_ok_response_bytes_match_protobuf_and_read_back(payload: bytes) -> None:
    expected = ttrpc_pb2.Response(status=status_pb2.Status(), payload=payload).SerializeToString()
    encoded = encode_ok_response(payload)
    assert encoded == expected
    assert ok_response_payload(encoded) == payload


_response_like = st.one_of(
    st.binary(max_size=64),
    # mostly the canonical prefix, then arbitrary (often wrong) lengths and tails
    st.builds(lambda rest: b"\x0a\x00\x12" + rest, st.binary(max_size=200)),
    st.builds(lambda rest: b"\x0a\x00" + rest, st.binary(max_size=8)),
)


@given(_response_like)
def test_the_fast_read_never_disagrees_with_protobuf(data: bytes) -> None:
    fast = ok_response_payload(data)
    if fast is None:
        return  # left to the generated class
    response = ttrpc_pb2.Response()
    response.ParseFromString(data)
    assert response.status.code == 0 and not response.status.message
    assert not response.status.details
    assert response.payload == fast


@given(st.binary(min_size=1, max_size=300), st.binary(max_size=8))
def test_responses_with_extra_or_error_fields_fall_back(payload: bytes, extra: bytes) -> None:
    canonical = encode_ok_response(payload)
    assert ok_response_payload(canonical + b"\x12\x00" + extra) is None
    error = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="gone"))
    assert ok_response_payload(error.SerializeToString()) is None
    assert ok_response_payload(canonical[:-1]) is None
