"""Weights kept outside the ModelProto: placeholders and the store behind them.

protobuf (python-upb) hands a tensor's bytes to Python as a fresh copy, and takes them
back as another; serializing a model copies every weight once more. For a fold that
rewrites most weights of a large model that is most of the work. So the ONNX backend
keeps large main-graph weights *outside* the message:

* a **placeholder** is a TensorProto with its name, type and dims but no data, marked
  ``data_location = EXTERNAL`` with ``external_data = {location: LOCATION, offset: i}``;
  ``LOCATION`` carries a random per-process token, so no file can forge one;
* entry ``i`` of a :class:`Payloads` store holds the data: a :class:`Span` of the bytes
  the file was read into or mapped (nothing copied), a numpy array a fold computed
  (never turned into a ``bytes`` object), a :class:`~bnfuse.fold.Scaled` product a fold
  described but nobody has computed yet (the writer computes it block by block into one
  buffer), or the original TensorProto of a lazy copy
  (:func:`bnfuse.onnx.storage.external.lazy_copy`).

Folds read a placeholder as a read-only numpy view (:meth:`Payloads.array`) and write
new values with :meth:`Payloads.assign`; :func:`bnfuse.onnx.storage.serialize.chunks` writes a
placeholder's payload straight from its entry, and :meth:`Payloads.materialize` turns
placeholders back into ordinary tensors where a complete ModelProto is needed.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfuse.fold import Scaled

__all__ = ["LOCATION", "RAW_TYPES", "Payloads", "Span", "is_placeholder", "raw_bytes", "raw_dtype"]

#: external_data location of every placeholder (random per process: not forgeable by a file)
LOCATION = f"bnfuse-lazy:{os.urandom(8).hex()}"  # (secrets would import hashlib)
_EXTERNAL = onnx.TensorProto.EXTERNAL

_T = onnx.TensorProto
#: element types stored as little-endian raw bytes with a numpy dtype of their own
_DTYPES: dict[int, np.dtype[Any]] = {
    _T.FLOAT: np.dtype("<f4"),
    _T.DOUBLE: np.dtype("<f8"),
    _T.FLOAT16: np.dtype("<f2"),
    _T.INT8: np.dtype("i1"),
    _T.INT16: np.dtype("<i2"),
    _T.INT32: np.dtype("<i4"),
    _T.INT64: np.dtype("<i8"),
    _T.UINT8: np.dtype("u1"),
    _T.UINT16: np.dtype("<u2"),
    _T.UINT32: np.dtype("<u4"),
    _T.UINT64: np.dtype("<u8"),
    _T.BOOL: np.dtype("?"),
}


def raw_dtype(data_type: int) -> np.dtype[Any] | None:
    """The numpy dtype of a tensor type's raw bytes (bfloat16 via ml_dtypes), or None
    for types that are not one fixed-size number per element (strings, 4-bit, ...)."""
    dt = _DTYPES.get(data_type)
    if dt is None and data_type == _T.BFLOAT16:
        import ml_dtypes

        dt = np.dtype(ml_dtypes.bfloat16)
    return dt


#: element types stored as one fixed-size little-endian number per element in raw_data
RAW_TYPES = frozenset(_DTYPES) | {_T.BFLOAT16}


def raw_bytes(t: onnx.TensorProto) -> bytes | None:
    """The little-endian payload of an ordinary tensor (from ``raw_data`` or its typed
    field), or None for types without that form or data that does not match its dims."""
    if t.data_type not in RAW_TYPES:
        return None
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) != math.prod(int(d) for d in t.dims) * arr.dtype.itemsize:
        return None
    return data


@dataclass(frozen=True)
class Span:
    """``buf[start:end]``: a payload inside the bytes (or read-only memory map) of a
    model file.

    ``whole`` locates the entire serialized tensor the payload came from, when the file
    holds it in one piece (an initializer the wire reader cut out). A placeholder whose
    entry is still this span is that tensor unchanged (every change of a placeholder's
    data, dims or type goes through :meth:`Payloads.assign`, which gives it a new entry;
    nothing renames an initializer), so the writer copies those bytes as they are.
    """

    buf: bytes | mmap.mmap
    start: int
    end: int
    whole: tuple[int, int] | None = None

    def view(self) -> memoryview:
        """The payload, without copying it."""
        return memoryview(self.buf)[self.start : self.end]


Entry = onnx.TensorProto | Span | np.ndarray | Scaled


def is_placeholder(t: onnx.TensorProto) -> bool:
    """True for a tensor whose data lives in a :class:`Payloads` store."""
    return (
        t.data_location == _EXTERNAL
        and len(t.external_data) == 2
        and t.external_data[0].key == "location"
        and t.external_data[0].value == LOCATION
    )


def _placeholder_index(t: onnx.TensorProto) -> int | None:
    if not is_placeholder(t):
        return None
    offset = t.external_data[1]
    return int(offset.value) if offset.key == "offset" else None


def _raw_view(arr: np.ndarray) -> memoryview:
    return arr.reshape(-1).view(np.uint8).data


class Payloads:
    """The data of placeholder tensors (see the module docstring).

    Entries are never changed once added, so a copy of a model may share its store with
    the original: :meth:`branch` gives the copy a store of its own that starts with the
    same entries, so that what the copy's folds add goes when the copy goes.
    """

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: list[Entry] = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def branch(self) -> Payloads:
        """A store with the same entries; what is added to either stays its own."""
        return Payloads(self._entries)

    def add(self, entry: Entry) -> int:
        """Store ``entry``; returns its index."""
        self._entries.append(entry)
        return len(self._entries) - 1

    def mark(self, t: onnx.TensorProto, index: int) -> None:
        """Make ``t`` (metadata only) the placeholder of entry ``index``."""
        for field in ("raw_data", "external_data", "data_location"):
            t.ClearField(field)
        t.data_location = _EXTERNAL
        for key, value in (("location", LOCATION), ("offset", str(index))):
            entry = t.external_data.add()
            entry.key = key
            entry.value = value

    def entry(self, t: onnx.TensorProto) -> Entry | None:
        """What placeholder ``t`` stands for; None when ``t`` is not one of this store's."""
        i = _placeholder_index(t)
        if i is None or not 0 <= i < len(self._entries):
            return None
        return self._entries[i]

    def nbytes(self, t: onnx.TensorProto) -> int | None:
        """Payload size of placeholder ``t`` in bytes, when known without reading it."""
        e = self.entry(t)
        if isinstance(e, Span):
            return e.end - e.start
        if isinstance(e, np.ndarray | Scaled):
            return int(e.nbytes)
        return None

    def original(self, t: onnx.TensorProto) -> memoryview | None:
        """The serialized bytes of placeholder ``t`` as the file holds them, when ``t``
        is an unchanged tensor cut out of a file (see :class:`Span`), else None."""
        e = self.entry(t)
        if isinstance(e, Span) and e.whole is not None:
            return memoryview(e.buf)[e.whole[0] : e.whole[1]]
        return None

    def array(self, t: onnx.TensorProto, entry: Entry | None = None) -> np.ndarray:
        """The value of placeholder ``t``: a read-only view where possible (``entry``:
        ``self.entry(t)``, when the caller has it).

        Raises ValueError when the payload does not match the tensor's shape and type.
        """
        e = entry if entry is not None else self.entry(t)
        if e is None:
            raise ValueError(f"tensor {t.name!r} is not a placeholder of this store")
        if isinstance(e, np.ndarray):
            return e
        if isinstance(e, Scaled):
            return np.asarray(e)
        if isinstance(e, onnx.TensorProto):
            return numpy_helper.to_array(e)
        dt = raw_dtype(t.data_type)
        count = math.prod(int(d) for d in t.dims)
        if dt is None or count * dt.itemsize != e.end - e.start:
            raise ValueError(
                f"tensor {t.name!r} cannot be read ({e.end - e.start} bytes of data for "
                f"shape {list(t.dims)} of type {onnx.TensorProto.DataType.Name(t.data_type)})"
            )
        arr = np.frombuffer(e.buf, dtype=dt, count=count, offset=e.start)
        return arr.reshape(tuple(int(d) for d in t.dims))

    def assign(self, t: onnx.TensorProto, arr: np.ndarray | Scaled, dtype_id: int) -> None:
        """Make ``t`` a placeholder holding ``arr`` (its dims and type set from it); a
        :class:`~bnfuse.fold.Scaled` product is kept as it is, to be computed when written."""
        if not isinstance(arr, Scaled):
            arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            arr.flags.writeable = False
        t.data_type = dtype_id
        del t.dims[:]
        t.dims.extend(int(d) for d in arr.shape)
        self.mark(t, self.add(arr))

    def pieces(
        self, t: onnx.TensorProto, reuse: bool = False
    ) -> tuple[int, Iterator[bytes | memoryview]] | None:
        """``(size, chunks)``: the little-endian payload of placeholder ``t`` for writing,
        as consecutive pieces, without copying where possible (a :class:`Span` is a view
        of the file's bytes, an array a view of itself, a :class:`~bnfuse.fold.Scaled`
        product is computed block by block). With ``reuse`` the blocks of a product share
        one buffer: write each before taking the next. None when the entry has no raw form
        (e.g. a lazy copy of a tensor of strings: :meth:`fill` it instead)."""
        e = self.entry(t)
        if isinstance(e, Span):
            return e.end - e.start, iter((e.view(),))
        if isinstance(e, np.ndarray):
            return e.nbytes, iter((_raw_view(e),))
        if isinstance(e, Scaled):
            return e.nbytes, (_raw_view(b) for b in e.blocks(reuse))
        if isinstance(e, onnx.TensorProto):
            raw = raw_bytes(e)
            return None if raw is None else (len(raw), iter((raw,)))
        return None

    def fill(self, t: onnx.TensorProto) -> None:
        """Turn placeholder ``t`` into an ordinary tensor holding its data."""
        e = self.entry(t)
        if e is None:
            return
        if isinstance(e, onnx.TensorProto):
            t.CopyFrom(e)
            return
        if isinstance(e, Span):
            data = bytes(e.view())
        else:
            data = _raw_view(np.ascontiguousarray(np.asarray(e))).tobytes()
        for field in ("external_data", "data_location"):
            t.ClearField(field)
        t.raw_data = data

    def release_pages(self) -> None:
        """Let go of the pages of memory-mapped files this store has touched.

        They are file pages, read back from the page cache (or the disk) when used again;
        meanwhile they no longer count for this process. Called before onnxruntime loads
        a model, which then holds its own copy or mapping of the weights.
        """
        advise = getattr(mmap.mmap, "madvise", None)
        dontneed = getattr(mmap, "MADV_DONTNEED", None)
        if advise is None or dontneed is None:  # pragma: no cover - platforms without madvise
            return
        seen: set[int] = set()
        for e in self._entries:
            if isinstance(e, Span) and isinstance(e.buf, mmap.mmap) and id(e.buf) not in seen:
                seen.add(id(e.buf))
                with contextlib.suppress(OSError, ValueError):  # closed, or unsupported
                    e.buf.madvise(dontneed)

    def materialize(self, tensors: Iterable[onnx.TensorProto]) -> None:
        """:meth:`fill` every placeholder among ``tensors``."""
        for t in tensors:
            if is_placeholder(t):
                self.fill(t)
