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
as ``SerializeToString``). A message carrying fields this protobuf schema does not know
(unknown fields) is serialized the ordinary way, so nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx

__all__ = ["chunks", "to_bytes", "write"]

_GRAPH_TAG = b"\x3a"  # ModelProto.graph: field 7, wire type 2
_INITIALIZER_TAG = b"\x2a"  # GraphProto.initializer: field 5, wire type 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


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


def chunks(model: onnx.ModelProto) -> list[bytes]:
    """The serialized model as a list of byte strings whose concatenation parses to
    ``model`` (see the module docstring)."""
    if not model.HasField("graph") or _has_unknown_fields(model):
        return [model.SerializeToString()]
    graph = model.graph
    if _has_unknown_fields(graph):
        return [model.SerializeToString()]
    head = onnx.ModelProto()
    _copy_except(model, head, "graph")
    light = onnx.GraphProto()
    _copy_except(graph, light, "initializer")
    body: list[bytes] = [light.SerializeToString()]
    for tensor in graph.initializer:
        data = tensor.SerializeToString()
        body.append(_INITIALIZER_TAG + _varint(len(data)))
        body.append(data)
    size = sum(len(c) for c in body)
    return [head.SerializeToString(), _GRAPH_TAG + _varint(size), *body]


def to_bytes(model: onnx.ModelProto) -> bytes:
    """``model.SerializeToString()``, faster for models with large initializers."""
    parts = chunks(model)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write(model: onnx.ModelProto, path: str | Path) -> None:
    """Serialize ``model`` into the file ``path`` (created or truncated)."""
    parts: Iterable[bytes] = chunks(model)
    with open(path, "wb") as f:
        f.writelines(parts)
