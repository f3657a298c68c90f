"""ONNX model files in and out: read, check, hand to onnxruntime, complete, write.

This module puts the storage machinery (:mod:`.wire` cuts a file's bytes, :mod:`.payloads`
keeps large weights in the file as placeholders, :mod:`.external` checks, maps and writes
external data, :mod:`.serialize` writes a message in pieces) behind a few calls:
:class:`ModelFiles` (``load``, ``accept``, ``save``, ``size``), :func:`session_source`
and :func:`complete`. The rest of bnfuse goes through :mod:`bnfuse.onnx.storage`.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bnfuse.backend import atomic_path
from bnfuse.errors import ModelLoadError, UnsupportedModelError, UsageError, first_line
from bnfuse.onnx.storage import external, serialize, wire
from bnfuse.onnx.storage.payloads import LOCATION, Payloads, Span, is_placeholder, raw_dtype

__all__ = [
    "FILE_PATH_THRESHOLD",
    "MMAP_THRESHOLD",
    "RUN_FROM_FILE_THRESHOLD",
    "SPLIT_THRESHOLD",
    "Header",
    "ModelFiles",
    "OnnxModel",
    "TempModelFile",
    "complete",
    "model_bytes",
    "read_header",
    "session_source",
]

#: From this many bytes (weights, estimated without serializing) on, a model is saved with
#: its weights in an external data file: protobuf cannot serialize a message of 2 GiB or
#: more. Tests lower it to exercise that path.
FILE_PATH_THRESHOLD = 2_000_000_000

#: From this many bytes on, a model that is not on disk unchanged is handed to
#: onnxruntime as a temporary file with external data instead of serialized bytes:
#: onnxruntime maps such data from the file, where from bytes it holds the message and
#: its own copy of every weight (measured: 1.1x the weights from a file, 3x from bytes).
RUN_FROM_FILE_THRESHOLD = 32 << 20

#: Files from this size on are memory-mapped instead of read: the weights then stay in
#: the page cache (no copy, no fresh memory to fault in: reading 100 MB costs ~40 ms on
#: a small VM, mapping it ~1 ms). The mapping is read-only; the input is never changed.
MMAP_THRESHOLD = 1 << 20

#: Files from this size on are cut by :func:`bnfuse.onnx.storage.wire.split` (large weights
#: stay in the file's bytes); smaller ones are parsed whole, which protobuf's C parser
#: does faster than the scan (20 KB: 3 us against 70 us) and costs no memory to speak of.
SPLIT_THRESHOLD = 1 << 20


@dataclass(eq=False)
class OnnxModel:
    """A model as bnfuse passes it around: the ModelProto, the store of its placeholder
    tensors (see :mod:`bnfuse.onnx.storage.payloads`), and the file it was read from
    while it is unchanged (onnxruntime then loads that file instead of a copy).

    :func:`complete` turns it into an ordinary, complete ModelProto.
    """

    proto: onnx.ModelProto
    payloads: Payloads | None = None
    source: Path | None = None
    #: (nodes, BN nodes, parameters), counted once (the backend never changes a model it
    #: has handed out; an in-place fold makes a new OnnxModel)
    counts: tuple[int, int, int] | None = None


def wrap(model: onnx.ModelProto | OnnxModel) -> OnnxModel:
    """``model`` as an :class:`OnnxModel` (a plain ModelProto has no store, no source)."""
    return model if isinstance(model, OnnxModel) else OnnxModel(model)


def model_bytes(model: onnx.ModelProto, tensors: Sequence[onnx.TensorProto] | None = None) -> int:
    """The model's approximate serialized size: its tensors' payloads plus 1 KiB a node.

    (``ByteSize()`` would serialize the whole model to count.) ``tensors``: every tensor of
    the model (:func:`~bnfuse.onnx.storage.external.iter_tensors`), when the caller has them.
    """
    nodes = len(model.graph.node) + sum(len(f.node) for f in model.functions)
    every = tensors if tensors is not None else external.iter_tensors(model)
    return sum(external.payload_bytes(t) for t in every) + 1024 * nodes


def _tensors(model: onnx.ModelProto) -> tuple[list[onnx.TensorProto], list[onnx.TensorProto]]:
    """Every tensor of ``model`` (one walk), and those that are not main-graph initializers
    (:func:`~bnfuse.onnx.storage.external.iter_tensors` yields those first)."""
    every = list(external.iter_tensors(model))
    return every, every[len(model.graph.initializer) :]


class TempModelFile:
    """A model written to a private temporary directory (header + external data) so that
    onnxruntime can load it from a path; the directory goes when this object does."""

    def __init__(self, model: onnx.ModelProto, payloads: Payloads | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bnfuse-ort-")
        self.path = Path(self._dir.name) / "model.onnx"
        external.write_model(
            model,
            self.path,
            self.path.with_name("model.onnx.data"),
            "model.onnx.data",
            payloads=payloads,
            sync=False,
        )

    def cleanup(self) -> None:
        self._dir.cleanup()


def session_source(
    model: onnx.ModelProto | OnnxModel,
) -> tuple[str | bytes, TempModelFile | None]:
    """What to hand onnxruntime: the unchanged file the model came from, the serialized
    bytes, or (from :data:`RUN_FROM_FILE_THRESHOLD` on) a temporary file with external
    data, which lives as long as the returned :class:`TempModelFile`. onnxruntime holds
    the weights from then on: the pages of mapped input files this process touched are
    let go (:meth:`Payloads.release_pages`)."""
    m = wrap(model)
    source: str | bytes
    tmp = None
    every, nested = _tensors(m.proto)
    size = model_bytes(m.proto, every)
    if m.source is not None:
        source = str(m.source)
    elif size < RUN_FROM_FILE_THRESHOLD and size < FILE_PATH_THRESHOLD:
        source = serialize.to_bytes(m.proto, m.payloads, nested)
    else:
        tmp = TempModelFile(m.proto, m.payloads)
        source = str(tmp.path)
    if m.payloads is not None:
        m.payloads.release_pages()
    return source, tmp


def complete(model: onnx.ModelProto | OnnxModel) -> onnx.ModelProto:
    """The model as an ordinary ModelProto: every placeholder filled with its data (in
    place: the :class:`OnnxModel` gives up its store)."""
    if not isinstance(model, OnnxModel):
        return model
    if model.payloads is not None:
        external.materialize(model.proto, model.payloads)
        model.payloads = None
    return model.proto


def _read(path: Path) -> bytes | mmap.mmap:
    """The file's bytes: a read-only memory map for large files, else a bytes object."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size >= MMAP_THRESHOLD:
            try:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file system without mmap: read it
                pass
        return f.read()


def _parse(data: bytes | mmap.mmap) -> tuple[onnx.ModelProto, Payloads | None]:
    """Parse a model file's bytes; its large main-graph weights stay in ``data`` as
    placeholders (:func:`bnfuse.onnx.storage.wire.split`) when the bytes allow it."""
    cut = (
        wire.split(data, LOCATION, external.INLINE_LIMIT)
        if SPLIT_THRESHOLD <= len(data) < 2**31
        else None
    )
    if cut is not None:
        skeleton, spans = cut
        try:
            model = onnx.load_model_from_string(skeleton)
        except Exception:  # let the ordinary parse below say what is wrong
            pass
        else:
            payloads = Payloads(Span(data, a, b, (t0, t1)) for a, b, t0, t1 in spans)
            for t in model.graph.initializer:  # element types without a raw numpy form
                if is_placeholder(t) and raw_dtype(t.data_type) is None:
                    payloads.fill(t)
            return model, payloads
    return onnx.load_model_from_string(data if isinstance(data, bytes) else data[:]), None


def _check_model(model: onnx.ModelProto, path: Path | None) -> None:
    where = f"{path}: " if path else ""
    try:
        external.check_text(model)
    except UnicodeError:
        raise ModelLoadError(
            f"{where}not a readable ONNX model (a name is not valid UTF-8 text)"
        ) from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{where}not an ONNX model (no graph)")
    if not model.opset_import:
        raise ModelLoadError(f"{where}not an ONNX model (no opset_import)")


class ModelFiles:
    """Reads and writes model files, remembering the external data files of the models
    it read (an output must never overwrite one) and of those it wrote or read (a model's
    size on disk includes them)."""

    def __init__(self) -> None:
        # files models with external data were loaded from: (model path, data files)
        self._loaded: list[tuple[Path, list[str]]] = []
        # data files beside the models read or written: {header: [data files]}
        self._data_files: dict[Path, list[Path]] = {}

    def load(self, path: Path) -> OnnxModel:
        """Read an ONNX file; external data is read from beside it after every location
        was checked to stay inside the model's directory. Large weights stay in the file
        (memory-mapped) as placeholders. Raises :class:`ModelLoadError` with one line."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file")
        if path.is_dir():
            raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"{path}: permission denied")
        try:
            data = _read(path)
            if not len(data):
                raise ModelLoadError(f"{path}: empty file, not an ONNX model")
            model, payloads = _parse(data)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a readable ONNX model ({first_line(exc, 200)})"
            ) from None
        del data  # the payload store keeps what it needs
        _check_model(model, path)
        store = payloads if payloads is not None else Payloads()
        tensors = list(external.iter_tensors(model))  # one walk for the checks below
        try:
            files = external.load_external(model, path, store, tensors)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: cannot read external data ({first_line(exc, 200)})"
            ) from None
        reason = external.check_payloads(model, store, tensors)
        if reason:
            raise ModelLoadError(f"{path}: damaged ONNX model ({reason})")
        if files:
            self._loaded.append((path, files))
            self._data_files[path.resolve()] = [Path(f) for f in files]
        return OnnxModel(model, store if len(store) else None, path)

    def accept(self, model: Any) -> OnnxModel:
        """Check an in-memory ModelProto (it is copied before any change)."""
        if not isinstance(model, onnx.ModelProto):
            raise UnsupportedModelError(f"expected an onnx.ModelProto, got {type(model).__name__}")
        _check_model(model, None)
        if external.uses_external_data(model):
            where = ", ".join(repr(loc) for loc in external.external_locations(model)[:3])
            raise UnsupportedModelError(
                f"the model's weights are in external data ({where}) that was not loaded; "
                "pass the .onnx path instead of the ModelProto"
            )
        reason = external.check_payloads(model)
        if reason:
            raise ModelLoadError(f"damaged ONNX model ({reason})")
        return OnnxModel(model)

    def save(self, model: onnx.ModelProto | OnnxModel, path: Path) -> None:
        """Write atomically. A model when some model read had external data, or one too
        large for one protobuf, is written as ``path`` plus ``<name>.data`` beside it
        (relative location); never over the external data of a model read."""
        path = Path(path)
        m = wrap(model)
        every, nested = _tensors(m.proto)
        if any(external.is_external(t) for t in every):
            raise UnsupportedModelError(
                "the model refers to external data that was never loaded; cannot save it"
            )
        if self._loaded or model_bytes(m.proto, every) >= FILE_PATH_THRESHOLD:
            data = path.with_name(external.data_name(path)).resolve()
            for src, files in self._loaded:
                if str(data) in {os.path.realpath(f) for f in files}:
                    raise UsageError(
                        f"{path}: writing {data.name} would overwrite the external data of "
                        f"the input model {src}; choose another output name"
                    )
            written = external.save_with_external_data(m.proto, path, m.payloads)
            self._data_files[path.resolve()] = [written]
            return
        with atomic_path(path) as tmp:
            serialize.write(m.proto, tmp, m.payloads, nested)
        if self._data_files:
            self._data_files.pop(path.resolve(), None)

    def size(self, path: Path) -> int | None:
        """Bytes on disk of the model at ``path`` with the external data files beside it
        that it was read or written with; None when there is no such file."""
        path = Path(path)
        if not path.exists():
            return None
        size = path.stat().st_size
        for f in self._data_files.get(path.resolve(), []) if self._data_files else ():
            if f.exists():
                size += f.stat().st_size
        return size


@dataclass(frozen=True)
class Header:
    """What a model file's top-level fields say about its format and origin."""

    ir_version: int | None
    producer: str  # "tf2onnx 1.17.0"; "" when the file names none
    opsets: tuple[tuple[str, int], ...]  # (domain, version); "" is the default domain


# ModelProto fields (onnx.proto): ir_version = 1, producer_name = 2,
# producer_version = 3, opset_import = 8; OperatorSetIdProto: domain = 1, version = 2
_IR, _PRODUCER, _PRODUCER_VERSION, _OPSET = 1, 2, 3, 8


def read_header(path: Path) -> Header:
    """The IR version, producer and opsets of the ONNX file at ``path``, read from the
    top-level protobuf fields without decoding the graph or its weights (microseconds on
    a 100 MB model). Raises ``OSError`` or ``ValueError`` (a damaged file)."""

    def text(buf: mmap.mmap, start: int, end: int) -> str:
        return bytes(buf[start:end]).decode("utf-8", "replace")

    ir: int | None = None
    name = version = ""
    opsets: list[tuple[str, int]] = []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, wire_type, _, start, end in wire.fields(buf, 0, len(buf)):
            if number == _IR and wire_type == 0:
                ir = start  # a varint field's value comes as ``start``
            elif number == _PRODUCER and wire_type == 2:
                name = text(buf, start, end)
            elif number == _PRODUCER_VERSION and wire_type == 2:
                version = text(buf, start, end)
            elif number == _OPSET and wire_type == 2:
                domain, ver = "", 0
                for n, wt, _, a, b in wire.fields(buf, start, end):
                    if n == 1 and wt == 2:
                        domain = text(buf, a, b)
                    elif n == 2 and wt == 0:
                        ver = a
                opsets.append((domain, ver))
    producer = " ".join(p for p in (name, version) if p)
    return Header(ir, producer, tuple(opsets))
