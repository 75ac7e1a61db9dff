"""The ttrpc envelopes (``Request``, ``Response``) coded by hand on the hot path.

Building a generated ``Request`` per call and parsing a ``Response`` costs more
than the few bytes involved. These functions produce exactly the bytes the
generated classes serialize (fields in number order, proto3 defaults left out),
and read only the canonical shape of a successful response; anything else
(an error status, unknown fields, odd encodings, strings that are not valid
text) goes through the generated classes, so the result never differs from
theirs. ``tests/unit/test_ttrpc_envelope.py`` checks both against them.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent_proto import ttrpc_pb2

_OK_STATUS_FIELD = b"\x0a\x00"  # field 1 (status), an empty google.rpc.Status
_INT64_LIMIT = 1 << 63
_MAX_CACHED_NAMES = 1024

# (service, method) -> their encoded fields: a client calls few distinct methods
_names: dict[tuple[str, str], bytes] = {}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field, or nothing for the proto3 default (empty)."""
    return tag + _varint(len(data)) + data if data else b""


def encode_request(
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int = 0,
    metadata: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Return ``ttrpc.Request(...).SerializeToString()`` for these fields."""
    if type(service) is str and type(method) is str and type(payload) is bytes:
        names = _names.get((service, method))
        if names is not None and not timeout_nano and not metadata:
            # the common call: encoded names reused, only the payload is new
            return names + _field(b"\x1a", payload) if payload else names
    if (
        type(service) is not str
        or type(method) is not str
        or type(payload) is not bytes
        or type(timeout_nano) is not int
        or not 0 <= timeout_nano < _INT64_LIMIT
    ):
        return _generated_request(service, method, payload, timeout_nano, metadata)
    try:
        names = _field(b"\x0a", service.encode()) + _field(b"\x12", method.encode())
        if len(_names) < _MAX_CACHED_NAMES:
            _names[service, method] = names
        parts = [names, _field(b"\x1a", payload)]
        if timeout_nano:
            parts.append(b"\x20" + _varint(timeout_nano))
        for key, value in metadata:
            if type(key) is not str or type(value) is not str:
                raise TypeError
            pair = _field(b"\x0a", key.encode()) + _field(b"\x12", value.encode())
            parts.append(b"\x2a" + _varint(len(pair)) + pair)
    except (UnicodeEncodeError, TypeError):
        # let the generated class accept or refuse it exactly as it would
        return _generated_request(service, method, payload, timeout_nano, metadata)
    return b"".join(parts)


def _generated_request(
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int,
    metadata: Sequence[tuple[str, str]],
) -> bytes:
    request = ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout_nano
    )
    for key, value in metadata:
        request.metadata.add(key=key, value=value)
    return request.SerializeToString()


def encode_ok_response(payload: bytes) -> bytes:
    """Return ``Response(status=Status(), payload=payload).SerializeToString()``."""
    if not payload:
        return _OK_STATUS_FIELD
    return _OK_STATUS_FIELD + b"\x12" + _varint(len(payload)) + payload


def ok_response_payload(data: bytes) -> bytes | None:
    """The payload of an encoded OK ``Response`` in canonical form, else None.

    None means "parse it with the generated class": an error status, fields in
    another order or encoding, trailing or unknown fields.
    """
    if not data.startswith(_OK_STATUS_FIELD):
        return None
    if len(data) == 2:
        return b""
    if data[2] != 0x12:
        return None
    length = data[3] if len(data) > 3 else 0x80
    if length < 0x80:
        start = 4
    else:  # a multi-byte length: decode it, still requiring an exact fit
        length, start, shift = 0, 3, 0
        while start < len(data) and shift < 35:
            byte = data[start]
            length |= (byte & 0x7F) << shift
            start += 1
            shift += 7
            if byte < 0x80:
                break
        else:
            return None
    if start + length != len(data) or length == 0:
        return None
    return data[start:]
