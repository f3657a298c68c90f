"""Fast serialization of ONNX models whose weights are in the main graph's initializers.

``ModelProto.SerializeToString()`` on a model of large tensors is several times slower
than serializing each tensor on its own (the python-upb runtime encodes one growing
buffer). Protobuf's wire format allows a message to be written in pieces: a length-
delimited field is ``tag, varint(length), payload``, fields may come in any order, and a
repeated field's elements are simply concatenated. So a model is written as

    <ModelProto without its graph>
    tag(graph) varint(len)
        <GraphProto without its initializers>
        tag(initializer) varint(len) <TensorProto>     (one per initializer, in order)

which parses to exactly the same message (tested: re-serializing gives the same bytes
as ``SerializeToString``). A placeholder initializer (:mod:`bnfuse.onnx.storage.payloads`) is
written as the tensor it stands for, its payload taken straight from the store: a view of
the bytes the input file was read into, or of the array a fold computed - never copied
into a ``bytes`` object first. A message carrying fields this protobuf schema does not
know (unknown fields) is serialized the ordinary way, so nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx

from bnfuse.backend import open_fresh
from bnfuse.onnx.storage.payloads import Payloads, is_placeholder
from bnfuse.onnx.storage.wire import fields, tag, varint

__all__ = ["chunks", "to_bytes", "write"]

_GRAPH_TAG = tag(7, 2)  # ModelProto.graph
_INITIALIZER_TAG = tag(5, 2)  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_RAW_TAG = tag(_RAW_DATA, 2)

Chunk = bytes | memoryview


def _has_unknown_fields(msg: Any) -> bool:
    try:
        from google.protobuf import unknown_fields
    except ImportError:  # pragma: no cover - older protobuf: be safe
        return True
    return len(unknown_fields.UnknownFieldSet(msg)) > 0


def _copy_except(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of ``src`` into ``dst`` except the field named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _placeholder(
    t: onnx.TensorProto, payloads: Payloads, reuse: bool
) -> tuple[bytes, int, Iterable[Chunk], bytes]:
    """The serialized tensor placeholder ``t`` stands for, as ``(head, payload size,
    payload pieces, tail)``: its metadata with the payload spliced in where
    ``SerializeToString`` would put ``raw_data`` (so the field order, and the bytes, are
    the same)."""
    meta = onnx.TensorProto()
    meta.CopyFrom(t)  # a placeholder holds metadata only: a small copy
    found = payloads.pieces(t, reuse)
    if found is None:  # no raw form (a lazy copy of strings): the whole tensor
        payloads.fill(meta)
        return meta.SerializeToString(), 0, (), b""
    size, pieces = found
    meta.ClearField("external_data")
    meta.ClearField("data_location")
    enc = meta.SerializeToString()
    cut = next((f0 for n, _, f0, _, _ in fields(enc, 0, len(enc)) if n > _RAW_DATA), len(enc))
    return enc[:cut] + _RAW_TAG + varint(size), size, pieces, enc[cut:]


def chunks(
    model: onnx.ModelProto,
    payloads: Payloads | None = None,
    reuse: bool = False,
    nested: Iterable[onnx.TensorProto] | None = None,
) -> Iterator[Chunk]:
    """The serialized model as consecutive byte strings (or views) whose concatenation
    parses to ``model``, its placeholders filled from ``payloads`` (see the module
    docstring). With ``reuse``, pieces of a computed weight share one buffer: consume
    each before taking the next (as a file write does). ``nested``: the model's tensors
    other than its main-graph initializers, when the caller has them."""
    if payloads is not None:
        # placeholders are written from the store only as main-graph initializers: any
        # elsewhere (subgraphs, Constant nodes, functions) are filled into the model first
        if nested is None:
            from bnfuse.onnx.storage.external import iter_tensors

            nested = iter_tensors(model, main_initializers=False)
        payloads.materialize(nested)
    if (
        not model.HasField("graph")
        or _has_unknown_fields(model)
        or _has_unknown_fields(model.graph)
    ):
        if payloads is not None:
            payloads.materialize(model.graph.initializer)
        yield model.SerializeToString()
        return
    graph = model.graph
    head = onnx.ModelProto()
    _copy_except(model, head, "graph")
    light = onnx.GraphProto()
    _copy_except(graph, light, "initializer")
    light_bytes = light.SerializeToString()
    # every length first (the graph's comes before its contents), payloads afterwards
    body: list[tuple[bytes, Iterable[Chunk], bytes]] = []
    graph_size = len(light_bytes)
    for tensor in graph.initializer:
        data: Iterable[Chunk]
        if payloads is not None and is_placeholder(tensor):
            as_read = payloads.original(tensor)
            if as_read is not None:  # unchanged since it was read: its bytes as they are
                pre, size, data, post = b"", as_read.nbytes, (as_read,), b""
            else:
                pre, size, data, post = _placeholder(tensor, payloads, reuse)
        else:
            pre, size, data, post = tensor.SerializeToString(), 0, (), b""
        tensor_size = len(pre) + size + len(post)
        pre = _INITIALIZER_TAG + varint(tensor_size) + pre
        graph_size += len(pre) + size + len(post)
        body.append((pre, data, post))
    yield head.SerializeToString()
    yield _GRAPH_TAG + varint(graph_size)
    yield light_bytes
    for pre, data, post in body:
        yield pre
        yield from data
        if post:
            yield post


def to_bytes(
    model: onnx.ModelProto,
    payloads: Payloads | None = None,
    nested: Iterable[onnx.TensorProto] | None = None,
) -> bytes:
    """``model.SerializeToString()`` with its placeholders filled from ``payloads``,
    faster for models with large initializers (``nested``: see :func:`chunks`)."""
    return b"".join(chunks(model, payloads, nested=nested))


#: pieces from this size on are written where they are (a view of the input, a block of
#: a computed weight); smaller ones (tensor headers, small tensors) are gathered and
#: written together, up to ``_BATCH`` bytes at a time (a small model in one go)
_DIRECT = 64 << 10
_BATCH = 1 << 20


def write(
    model: onnx.ModelProto,
    path: str | Path,
    payloads: Payloads | None = None,
    nested: Iterable[onnx.TensorProto] | None = None,
) -> None:
    """Serialize ``model`` (placeholders filled from ``payloads``) into the file ``path``
    (created if needed; written without ``O_TRUNC``, see
    :func:`bnfuse.backend.atomic_path`): large pieces straight from where they are, small ones
    gathered."""
    with open_fresh(path) as f:
        small: list[Chunk] = []
        size = 0
        for piece in chunks(model, payloads, reuse=True, nested=nested):
            n = _size(piece)
            if n >= _DIRECT:
                if small:
                    f.write(b"".join(small))
                    small, size = [], 0
                f.write(piece)  # (a reused block is written before the next is computed)
                continue
            small.append(bytes(piece) if isinstance(piece, memoryview) else piece)
            size += n
            if size >= _BATCH:
                f.write(b"".join(small))
                small, size = [], 0
        if small:
            f.write(b"".join(small))
        f.truncate()


def _size(piece: Chunk) -> int:
    return piece.nbytes if isinstance(piece, memoryview) else len(piece)
