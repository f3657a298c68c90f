"""ONNX external data: safe loading, copies without the weights, and atomic writing.

A model above 2 GB cannot be one protobuf message on disk (nor be handed to onnxruntime
as bytes), so its tensors live in a data file beside it. This module

* checks every external ``location`` before anything is read: it must be a relative path
  inside the model's directory (no absolute path, no ``..``, no symlink leading out), the
  file must exist and be long enough;
* maps the data files read-only: main-graph weights become placeholders for spans of the
  map (:mod:`bnfuse.onnx.storage.payloads`), nothing is read at load; other external tensors
  are read tensor by tensor;
* writes a model as a small header plus one data file, again tensor by tensor (the
  placeholders straight from their store), without modifying the in-memory model and
  without serializing it whole;
* builds a *skeleton* copy (every field, but no large tensor payload) for work that only
  needs structure and shapes, such as ONNX shape inference.

So a fold holds about one copy of the weights: the mapped pages it reads.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfuse.backend import atomic_path, open_fresh
from bnfuse.errors import ModelLoadError, UnsupportedModelError
from bnfuse.onnx.storage.payloads import (
    RAW_TYPES,
    Payloads,
    Span,
    is_placeholder,
    raw_bytes,
    raw_dtype,
)

__all__ = [
    "INLINE_LIMIT",
    "check_locations",
    "external_locations",
    "iter_tensors",
    "load_external",
    "save_with_external_data",
    "skeleton",
    "uses_external_data",
    "write_model",
]

#: Tensors with fewer payload bytes stay inside the .onnx file (ONNX's own default).
INLINE_LIMIT = 1024
_ALIGN = 64
_EXTERNAL = onnx.TensorProto.EXTERNAL
DATA_FIELDS = frozenset(
    {
        "raw_data",
        "float_data",
        "int32_data",
        "string_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "external_data",
        "data_location",
    }
)
#: Messages that may (transitively) hold a TensorProto; everything else is copied whole.
_HOLDERS = frozenset(
    {
        "ModelProto",
        "GraphProto",
        "NodeProto",
        "AttributeProto",
        "FunctionProto",
        "SparseTensorProto",
        "TrainingInfoProto",
    }
)


# ---- walking ------------------------------------------------------------------------


def _graph_tensors(graph: onnx.GraphProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    if initializers:
        yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            yield a.t
        elif a.type == onnx.AttributeProto.TENSORS:
            yield from a.tensors
        elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        elif a.type == onnx.AttributeProto.GRAPH:
            yield from _graph_tensors(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sub in a.graphs:
                yield from _graph_tensors(sub)


def iter_tensors(
    model: onnx.ModelProto, main_initializers: bool = True
) -> Iterator[onnx.TensorProto]:
    """Every tensor of a model: initializers, attribute tensors, subgraphs, functions
    (without the main graph's initializers when ``main_initializers`` is false)."""
    yield from _graph_tensors(model.graph, main_initializers)
    for f in model.functions:
        for node in f.node:
            yield from _node_tensors(node)


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True when some tensor's payload lives in an external file (not loaded)."""
    return any(is_external(t) for t in iter_tensors(model))


def is_external(t: onnx.TensorProto) -> bool:
    """True when a tensor's payload is in an external file (not a bnfuse placeholder)."""
    return t.data_location == _EXTERNAL and not is_placeholder(t)


def _info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external data locations a model refers to, in first-use order."""
    seen: dict[str, None] = {}
    for t in iter_tensors(model):
        if is_external(t):
            seen.setdefault(_info(t).get("location", ""), None)
    return list(seen)


_STRING = onnx.TensorProto.DESCRIPTOR.fields[0].TYPE_STRING
_MESSAGE = onnx.TensorProto.DESCRIPTOR.fields[0].TYPE_MESSAGE


def check_text(msg: Any) -> None:
    """Check that every text field is valid UTF-8 (raises UnicodeError otherwise).

    Protobuf does not check UTF-8 when it parses ONNX's proto2 messages; an invalid name
    reads back as ``bytes`` and breaks later, when the pass writes it. Tensors are
    visited without touching their payload. (``"".join`` of the texts is the fast test:
    it fails on a ``bytes`` element.)
    """
    if msg.DESCRIPTOR.name == "TensorProto":
        texts = [msg.name, msg.doc_string]
        texts += [x for e in msg.external_data for x in (e.key, e.value)]
        try:
            "".join(texts)
        except TypeError:
            raise UnicodeError(
                f"tensor name or metadata is not valid UTF-8: {texts[0]!r}"
            ) from None
        return
    for fd, value in msg.ListFields():
        kind = fd.type
        if kind == _STRING:
            try:
                "".join(value) if fd.is_repeated else "".join((value,))
            except TypeError:
                raise UnicodeError(
                    f"{msg.DESCRIPTOR.name}.{fd.name} is not valid UTF-8 text"
                ) from None
        elif kind == _MESSAGE:
            if fd.is_repeated:
                for item in value:
                    check_text(item)
            else:
                check_text(value)


_T = onnx.TensorProto
#: typed payload field -> element types stored there (values per element)
_FIELDS: dict[str, dict[int, int]] = {
    "float_data": {_T.FLOAT: 1, _T.COMPLEX64: 2},
    "double_data": {_T.DOUBLE: 1, _T.COMPLEX128: 2},
    "int64_data": {_T.INT64: 1},
    "uint64_data": {_T.UINT32: 1, _T.UINT64: 1},
    "int32_data": {
        t: 1
        for t in (
            _T.INT32,
            _T.INT16,
            _T.INT8,
            _T.UINT16,
            _T.UINT8,
            _T.BOOL,
            _T.FLOAT16,
            _T.BFLOAT16,
        )
    },
    "string_data": {_T.STRING: 1},
}


#: raw payloads from this size on are not measured at load: ``len(t.raw_data)`` copies
#: the bytes (python-upb), tens of ms per 100 MB. A large payload of the wrong size is
#: still caught when a fold reads it (``graph._to_array``) and by onnxruntime on
#: validation; one nobody reads is written back unchanged.
RAW_CHECK_LIMIT = 1 << 20


def payload_reason(t: onnx.TensorProto, payloads: Payloads | None = None) -> str | None:
    """None when a tensor's stored data matches its shape and type (or cannot be checked
    cheaply: external, packed 4-bit/8-bit float types, raw payloads of
    ``RAW_CHECK_LIMIT`` bytes or more), else why not. A placeholder of ``payloads`` is
    checked against the size of its payload (known without reading it)."""
    size = payloads.nbytes(t) if payloads is not None and t.data_location == _EXTERNAL else None
    if t.data_location == _EXTERNAL and size is None:
        return None
    if any(int(d) < 0 for d in t.dims):
        return f"tensor {t.name!r} has a negative dimension"
    n = _elements(t)
    if size is None and t.HasField("raw_data"):
        dt = raw_dtype(t.data_type) if t.data_type in RAW_TYPES else None
        if dt is None or n * dt.itemsize >= RAW_CHECK_LIMIT:
            return None
        size = len(t.raw_data)
    if size is not None:  # raw bytes: a placeholder's payload, or raw_data
        dt = raw_dtype(t.data_type)
        need = n * (dt.itemsize if dt is not None else 0)
        if size != need:
            return f"tensor {t.name!r} holds {size} bytes but its shape {list(t.dims)} needs {need}"
        return None
    for fname, types in _FIELDS.items():
        if t.data_type in types:
            have = len(getattr(t, fname))
            if have != n * types[t.data_type]:
                return (
                    f"tensor {t.name!r} holds {have} values but its shape {list(t.dims)} "
                    f"needs {n * types[t.data_type]}"
                )
            return None
    return None


def check_payloads(
    model: onnx.ModelProto,
    payloads: Payloads | None = None,
    tensors: Iterable[onnx.TensorProto] | None = None,
) -> str | None:
    """The first tensor whose data does not match its shape (placeholders of ``payloads``
    included), as a reason; else None. ``tensors``: the model's tensors, if at hand."""
    for t in tensors if tensors is not None else iter_tensors(model):
        reason = payload_reason(t, payloads)
        if reason:
            return reason
    return None


# ---- loading ------------------------------------------------------------------------


def _int_field(info: dict[str, str], key: str, t: onnx.TensorProto, source: Path) -> int | None:
    if key not in info:
        return None
    try:
        value = int(info[key])
    except ValueError:
        raise ModelLoadError(
            f"{source}: tensor {t.name!r} has a non-integer external data {key} {info[key]!r}"
        ) from None
    if value < 0:
        raise ModelLoadError(f"{source}: tensor {t.name!r} has a negative external data {key}")
    return value


def _resolve(location: str, base: str, t: onnx.TensorProto, source: Path) -> str:
    """The real path of an external location, or ModelLoadError when it leaves ``base``."""
    if not location:
        raise ModelLoadError(f"{source}: tensor {t.name!r} has external data without a location")
    escapes = (
        os.path.isabs(location)
        or location.startswith(("/", "\\"))
        or (len(location) > 1 and location[0].isalpha() and location[1] == ":")  # C:...
        or ".." in location.replace("\\", "/").split("/")
        or "\x00" in location
    )
    full = "" if escapes else os.path.realpath(os.path.join(base, location))
    if escapes or os.path.commonpath([full, base]) != base:
        raise ModelLoadError(
            f"{source}: external data location {location!r} of tensor {t.name!r} points "
            "outside the model's directory; refusing to read it"
        )
    return full


def check_locations(
    model: onnx.ModelProto, source: Path, tensors: Iterable[onnx.TensorProto] | None = None
) -> dict[str, int]:
    """Validate every external reference of ``model`` (stored at ``source``) before reading
    (``tensors``: its external tensors, when the caller has them already).

    Returns ``{real path: size}`` of the data files. Raises ModelLoadError for a location
    outside the model's directory, a missing file, or offsets/lengths beyond its end.
    """
    base = os.path.realpath(Path(source).parent)
    files: dict[str, int] = {}
    for t in tensors if tensors is not None else iter_tensors(model):
        if not is_external(t):
            continue
        info = _info(t)
        location = info.get("location", "")
        full = _resolve(location, base, t, source)
        if full not in files:
            if not os.path.isfile(full):
                raise ModelLoadError(
                    f"{source}: external data file {location!r} (tensor {t.name!r}) is missing"
                )
            files[full] = os.path.getsize(full)
        offset = _int_field(info, "offset", t, source) or 0
        length = _int_field(info, "length", t, source)
        end = offset + (length or 0)
        if offset > files[full] or end > files[full]:
            raise ModelLoadError(
                f"{source}: external data file {location!r} is truncated (tensor {t.name!r} "
                f"needs bytes {offset}..{end}, the file has {files[full]})"
            )
    return files


def load_external(
    model: onnx.ModelProto,
    source: Path,
    payloads: Payloads | None = None,
    tensors: list[onnx.TensorProto] | None = None,
) -> list[str]:
    """Check (see :func:`check_locations`), then load every external tensor.

    With ``payloads``, a main-graph initializer of a plain numeric type becomes a
    placeholder for its bytes in a read-only memory map of the data file (nothing is read
    now; folds read it as a numpy view, the writer streams it); every other external
    tensor is read into memory. ``tensors``: every tensor of the model, when the caller
    has them already (:func:`iter_tensors`). Returns the real paths of the data files.
    """
    inits = list(model.graph.initializer)  # alive while ``mapped`` holds their ids
    every = tensors if tensors is not None else list(iter_tensors(model))
    externals = [t for t in every if is_external(t)]
    if not externals:
        return []
    files = check_locations(model, source, externals)
    base = os.path.realpath(Path(source).parent)
    handles: dict[str, Any] = {}
    maps: dict[str, mmap.mmap | None] = {}
    mapped = (
        {id(t) for t in inits if raw_dtype(t.data_type) is not None}
        if payloads is not None
        else set()
    )
    try:
        for t in externals:
            info = _info(t)
            full = _resolve(info.get("location", ""), base, t, source)
            f = handles.get(full)
            if f is None:
                f = handles[full] = open(full, "rb")  # noqa: SIM115 - closed below
            offset = _int_field(info, "offset", t, source) or 0
            length = _int_field(info, "length", t, source)
            end = files[full] if length is None else offset + length
            if payloads is not None and id(t) in mapped:
                if full not in maps:
                    maps[full] = _map(f)
                buf = maps[full]
                if buf is not None:
                    payloads.mark(t, payloads.add(Span(buf, offset, end)))
                    continue
            f.seek(offset)
            data = f.read(end - offset)
            if len(data) != end - offset:
                raise ModelLoadError(
                    f"{source}: external data file {info.get('location')!r} is truncated"
                )
            t.raw_data = data
            t.ClearField("data_location")
            del t.external_data[:]
    except OSError as exc:
        raise ModelLoadError(f"{source}: cannot read external data ({exc.strerror})") from None
    finally:
        for f in handles.values():
            f.close()
    return list(files)


def _map(f: Any) -> mmap.mmap | None:
    """A read-only memory map of an open file, or None where the file cannot be mapped."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # an empty file, a file system without mmap
        return None


# ---- copying without payloads -------------------------------------------------------

TensorHook = Callable[[onnx.TensorProto, onnx.TensorProto], None]


def _copy(src: Any, dst: Any, on_tensor: TensorHook) -> None:
    for fd, value in src.ListFields():
        if fd.type != fd.TYPE_MESSAGE:
            if fd.is_repeated:
                getattr(dst, fd.name).extend(value)
            else:
                setattr(dst, fd.name, value)
        elif fd.is_repeated:
            target = getattr(dst, fd.name)
            for item in value:
                _copy_item(item, target.add(), on_tensor)
        else:
            sub = getattr(dst, fd.name)
            sub.SetInParent()
            _copy_item(value, sub, on_tensor)


def _copy_item(src: Any, dst: Any, on_tensor: TensorHook) -> None:
    name = src.DESCRIPTOR.name
    if name == "TensorProto":
        on_tensor(src, dst)
    elif name in _HOLDERS:
        _copy(src, dst, on_tensor)
    else:
        dst.CopyFrom(src)


_META_FIELDS = tuple(fd for fd in onnx.TensorProto.DESCRIPTOR.fields if fd.name not in DATA_FIELDS)


def _copy_meta(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    """Copy a tensor's name, type, dims, ... but none of its data fields.

    The fields are visited one by one: ``ListFields()`` would hand back ``raw_data`` too,
    and the python-upb runtime returns a bytes field as a fresh copy, so listing a large
    tensor's fields briefly costs a second copy of its payload (at save time, on top of
    the one being written).
    """
    for fd in _META_FIELDS:
        value = getattr(src, fd.name)
        if fd.is_repeated:
            if not len(value):
                continue
        elif not src.HasField(fd.name):
            continue
        if fd.type != fd.TYPE_MESSAGE:
            if fd.is_repeated:
                getattr(dst, fd.name).extend(value)
            else:
                setattr(dst, fd.name, value)
        elif fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        else:
            getattr(dst, fd.name).CopyFrom(value)


def _elements(t: onnx.TensorProto) -> int:
    return math.prod(int(d) for d in t.dims)


def payload_bytes(t: onnx.TensorProto) -> int:
    """Size of a tensor's payload in bytes (estimated from dims and type)."""
    if is_external(t):
        length = _info(t).get("length")
        return int(length) if length and length.isdigit() else INLINE_LIMIT
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        itemsize = 1
    return _elements(t) * itemsize


def has_large_payloads(model: onnx.ModelProto, limit: int = INLINE_LIMIT) -> bool:
    """True when some tensor holds ``limit`` bytes of data or more inside the message (not
    a placeholder, not external), as its dims and type say."""
    return any(
        t.data_location != _EXTERNAL
        and (bool(t.string_data) or math.prod(t.dims) * 8 >= limit)  # cheap test first
        and payload_bytes(t) >= limit
        for t in iter_tensors(model)
    )


def skeleton(model: onnx.ModelProto, limit: int = INLINE_LIMIT) -> onnx.ModelProto:
    """A copy of ``model`` whose tensors of ``limit`` bytes or more carry no data.

    Everything else (nodes, attributes, shapes, small constants such as Reshape targets)
    is kept, which is what shape inference needs; the weights are not duplicated.
    """

    def hook(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
        if src.data_location != _EXTERNAL and payload_bytes(src) < limit:
            dst.CopyFrom(src)
        else:
            _copy_meta(src, dst)

    out = onnx.ModelProto()
    _copy(model, out, hook)
    return out


# ---- lazy copies: the fused model shares nothing, yet duplicates no weight ------------


def lazy_copy(
    model: onnx.ModelProto, payloads: Payloads | None = None, limit: int = INLINE_LIMIT
) -> tuple[onnx.ModelProto, Payloads]:
    """A copy of ``model`` whose large tensors are placeholders for the originals.

    A placeholder (see :mod:`bnfuse.onnx.storage.payloads`) keeps the tensor's name, type and
    dims and refers to the original tensor. Reading it goes through the returned store;
    overwriting it (a fold writes a new weight) drops the reference; materializing copies
    the data of the placeholders left over. The copy then holds each weight once,
    whichever was changed: with protobuf's arena allocation, copying everything first and
    overwriting the folded weights afterwards would hold them twice in the copy.

    ``payloads`` is the store of placeholders ``model`` already has (a model loaded by
    :func:`bnfuse.onnx.storage.wire.split`); the copy shares those and gets a branch of it.
    """
    store = payloads.branch() if payloads is not None else Payloads()

    def hook(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
        if src.data_location == _EXTERNAL or payload_bytes(src) < limit:
            dst.CopyFrom(src)  # small, external, or already a placeholder of ``store``
            return
        _copy_meta(src, dst)
        store.mark(dst, store.add(src))

    out = onnx.ModelProto()
    _copy(model, out, hook)
    return out, store


def materialize(model: onnx.ModelProto, payloads: Payloads | None) -> None:
    """Fill every placeholder left in ``model`` with its data."""
    if payloads is not None and len(payloads):
        payloads.materialize(iter_tensors(model))


# ---- writing ------------------------------------------------------------------------


def write_model(
    model: onnx.ModelProto,
    path: Path,
    data_path: Path,
    location: str,
    limit: int = INLINE_LIMIT,
    payloads: Payloads | None = None,
    sync: bool = True,
) -> None:
    """Write ``model`` as a header at ``path`` and its large tensors to ``data_path``.

    The header refers to the data as ``location`` (relative to the header's directory).
    ``model`` itself is not modified; tensors are copied out one at a time, placeholders
    straight from ``payloads``. ``sync`` flushes both files to disk (not needed for a
    temporary copy).
    """
    with open_fresh(data_path) as f:

        def hook(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
            if payloads is not None and is_placeholder(src):
                found = payloads.pieces(src, reuse=True)
                if found is None:  # no raw form (a lazy copy of strings): write it whole
                    dst.CopyFrom(src)
                    payloads.fill(dst)
                    return
                _copy_meta(src, dst)
                _to_data_file(dst, f, found[0], found[1], location)
                return
            if is_external(src) or is_placeholder(src):
                raise UnsupportedModelError(
                    f"tensor {src.name!r} refers to external data that was never loaded"
                )
            data = raw_bytes(src) if payload_bytes(src) >= limit else None
            if data is None:
                dst.CopyFrom(src)
                return
            _copy_meta(src, dst)
            _to_data_file(dst, f, len(data), (data,), location)

        header = onnx.ModelProto()
        _copy(model, header, hook)
        f.truncate()
        f.flush()
        if sync:
            os.fsync(f.fileno())
    with open_fresh(path) as h:
        h.write(header.SerializeToString())
        h.truncate()
        h.flush()
        if sync:
            os.fsync(h.fileno())


def _to_data_file(
    dst: onnx.TensorProto,
    f: Any,
    size: int,
    pieces: Iterable[bytes | memoryview],
    location: str,
) -> None:
    """Append a payload to the data file ``f`` (aligned) and point ``dst`` at it."""
    pad = -f.tell() % _ALIGN
    if pad:
        f.write(b"\0" * pad)
    offset = f.tell()
    for piece in pieces:
        f.write(piece)
    dst.data_location = _EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", size)):
        entry = dst.external_data.add()
        entry.key = key
        entry.value = str(value)


def data_name(dest: Path) -> str:
    """The external data file name written beside ``dest``: ``<output name>.data``."""
    return f"{Path(dest).name}.data"


def save_with_external_data(
    model: onnx.ModelProto, dest: Path, payloads: Payloads | None = None
) -> Path:
    """Write ``model`` to ``dest`` plus ``<dest name>.data`` beside it, atomically.

    Both files are written under temporary names in the destination directory and only
    renamed into place once complete (data first, then the header that refers to it); on
    any error or interrupt the temporary files are removed and nothing else changes.
    Returns the data file's path.
    """
    dest = Path(dest)
    data_dest = dest.with_name(data_name(dest))
    # the inner context renames first: the data file is in place before the header
    with atomic_path(dest) as tmp_header, atomic_path(data_dest) as tmp_data:
        write_model(model, tmp_header, tmp_data, data_dest.name, payloads=payloads)
    return data_dest
