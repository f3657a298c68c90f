"""Protobuf wire format, just enough to load an ONNX file without copying its weights.

A serialized message is a sequence of fields ``tag value`` where ``tag = number << 3 |
wire type`` (a varint); a length-delimited value (wire type 2: strings, bytes, nested
messages, packed repeated numbers) is ``varint(length) payload``. Fields may come in any
order, and a parser keeps every field it does not look at byte for byte.

:func:`split` uses that to cut a model's bytes into a small *skeleton* (every field of the
model, but each large main-graph weight replaced by a placeholder that names its place in
the original bytes) without handing the weights to protobuf at all: the skeleton parses in
microseconds, and the weights stay where they are, in the buffer the file was read into,
until a fold reads one as a numpy view or the writer copies it straight to the output file.

Anything outside the plain shape this reader expects (a field twice where protobuf would
merge, group wire types, a tensor with typed data fields or external data, lengths that
run past the end) makes :func:`split` return None, and the caller parses the file the
ordinary way - which is also what reports damaged files.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

__all__ = ["fields", "split", "tag", "varint"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto fields (onnx.proto)
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_T_RAW_DATA = 9
_T_EXTERNAL_DATA = 13
_T_DATA_LOCATION = 14
#: typed data fields, segment and external data: a tensor with any of these stays inline
_T_NOT_PLAIN = frozenset({3, 4, 5, 6, 7, 10, 11, _T_EXTERNAL_DATA, _T_DATA_LOCATION})


class WireError(ValueError):
    """The bytes are not the plain protobuf this module reads (the caller falls back)."""


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def tag(number: int, wire_type: int) -> bytes:
    """The encoded tag of field ``number`` with ``wire_type``."""
    return varint(number << 3 | wire_type)


Buffer = bytes | mmap.mmap


def _read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields of the message in ``buf[start:end]``.

    Yields ``(number, wire_type, field_start, value_start, value_end)``: the field's
    bytes are ``buf[field_start:value_end]``; for wire type 2 the payload is
    ``buf[value_start:value_end]``; for a varint ``value_start`` holds its value.
    Raises :class:`WireError` on anything malformed or on group wire types.
    """
    pos = start
    while pos < end:
        field_start = pos
        key = buf[pos]  # one-byte varints (most tags, lengths and values) read inline
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type in (_LEN, _VARINT):  # a varint follows: the length or the value
            value = buf[pos] if pos < end else 0x80
            if value < 0x80:
                pos += 1
            else:
                value, pos = _read_varint(buf, pos, end)
            if wire_type == _VARINT:
                yield number, wire_type, field_start, value, pos
                continue
            value_end = pos + value
            if value_end > end:
                raise WireError("length runs past the end")
            yield number, wire_type, field_start, pos, value_end
            pos = value_end
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
            if pos > end:
                raise WireError("fixed-size value runs past the end")
            yield number, wire_type, field_start, pos, pos
        else:
            raise WireError(f"unsupported wire type {wire_type}")


_KEY_TAG, _VALUE_TAG, _EXTERNAL_TAG = tag(1, _LEN), tag(2, _LEN), tag(_T_EXTERNAL_DATA, _LEN)


def _entry(key: str, value: str) -> bytes:
    """An ``external_data`` entry (StringStringEntryProto: key = 1, value = 2)."""
    k, v = key.encode(), value.encode()
    body = b"".join((_KEY_TAG, varint(len(k)), k, _VALUE_TAG, varint(len(v)), v))
    return b"".join((_EXTERNAL_TAG, varint(len(body)), body))


def _plain_payload(buf: Buffer, start: int, end: int) -> tuple[int, int, int] | None:
    """``(field start, payload start, payload end)`` of the raw_data of a tensor that
    holds its data only there, else None."""
    raw: tuple[int, int, int] | None = None
    for number, wire_type, f0, v0, v1 in fields(buf, start, end):
        if number in _T_NOT_PLAIN:
            return None
        if number == _T_RAW_DATA:
            if wire_type != _LEN or raw is not None:
                return None
            raw = (f0, v0, v1)
    return raw


def split(
    data: Buffer, location: str, limit: int
) -> tuple[bytes, list[tuple[int, int, int, int]]] | None:
    """Cut a serialized ModelProto into a skeleton and its large weights.

    Every main-graph initializer whose data is a ``raw_data`` payload of ``limit`` bytes
    or more is replaced by the same tensor without ``raw_data``, marked as placeholder
    ``i`` the way :meth:`bnfuse.onnx.storage.payloads.Payloads.mark` marks one (``external_data``
    ``location``, ``offset: i``, then ``data_location = EXTERNAL``); ``spans[i] =
    (start, end, tensor start, tensor end)`` locates its payload, and the whole tensor
    message, in ``data``. Everything else is copied byte for byte. Returns None when the
    bytes are not the plain shape this handles (see the module docstring).
    """
    try:
        return _split(data, location, limit)
    except WireError:
        return None


def _split(
    data: Buffer, location: str, limit: int
) -> tuple[bytes, list[tuple[int, int, int, int]]] | None:
    view = memoryview(data)
    graph: tuple[int, int, int] | None = None
    for number, wire_type, f0, v0, v1 in fields(data, 0, len(data)):
        if number == _MODEL_GRAPH:
            if wire_type != _LEN or graph is not None:
                return None  # protobuf would merge two graph fields
            graph = (f0, v0, v1)
    if graph is None:
        return None
    g_field, g0, g1 = graph
    where = _entry("location", location)
    external = tag(_T_DATA_LOCATION, _VARINT) + varint(1)
    init_tag = tag(_GRAPH_INITIALIZER, _LEN)
    body: list[bytes | memoryview] = []
    spans: list[tuple[int, int, int, int]] = []
    copied = g0  # graph bytes before this position are in ``body`` already
    for number, wire_type, f0, v0, v1 in fields(data, g0, g1):
        if number != _GRAPH_INITIALIZER or wire_type != _LEN:
            continue
        raw = _plain_payload(data, v0, v1)
        if raw is None or raw[2] - raw[1] < limit:
            continue
        # the tensor's fields before and after raw_data, verbatim, then the marks
        marks = where + _entry("offset", str(len(spans))) + external
        size = (raw[0] - v0) + (v1 - raw[2]) + len(marks)
        spans.append((raw[1], raw[2], v0, v1))
        body += (
            view[copied:f0],
            init_tag + varint(size),
            view[v0 : raw[0]],
            view[raw[2] : v1],
            marks,
        )
        copied = v1
    if not spans:
        return None
    body.append(view[copied:g1])
    size = sum(map(len, body))
    head = (view[:g_field], tag(_MODEL_GRAPH, _LEN), varint(size))
    return b"".join((*head, *body, view[g1:])), spans
