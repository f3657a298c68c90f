"""The ONNX backend: load, fuse, count, run (onnxruntime), time, save."""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfuse import __version__
from bnfuse import providers as _providers
from bnfuse.backend import BenchTarget, FuseOptions, InputSpec, PassResult, atomic_path
from bnfuse.errors import ModelLoadError, UnsupportedModelError, UsageError, first_line
from bnfuse.onnx import external, serialize, wire
from bnfuse.onnx.fuse import RULE_NAMES, fuse_model
from bnfuse.onnx.graph import SUBGRAPH_OPS
from bnfuse.onnx.payloads import LOCATION, Payloads, Span, is_placeholder, raw_dtype
from bnfuse.result import ModelStats

__all__ = ["FILE_PATH_THRESHOLD", "OnnxBackend", "OnnxModel", "OrtRunner", "model_bytes"]

NORM_OPS = ("BatchNormalization",)

#: From this many bytes (weights, estimated without serializing) on, a model is saved with
#: its weights in an external data file: protobuf cannot serialize a message of 2 GiB or
#: more. Tests lower it to exercise that path.
FILE_PATH_THRESHOLD = 2_000_000_000

#: From this many bytes on, a model that is not on disk unchanged is handed to
#: onnxruntime as a temporary file with external data instead of serialized bytes:
#: onnxruntime maps such data from the file, where from bytes it holds the message and
#: its own copy of every weight (measured: 1.1x the weights from a file, 3x from bytes).
RUN_FROM_FILE_THRESHOLD = 32 << 20


def model_bytes(model: onnx.ModelProto, tensors: Sequence[onnx.TensorProto] | None = None) -> int:
    """The model's approximate serialized size: its tensors' payloads plus 1 KiB a node.

    (``ByteSize()`` would serialize the whole model to count.) ``tensors``: every tensor of
    the model (:func:`~bnfuse.onnx.external.iter_tensors`), when the caller has them.
    """
    nodes = len(model.graph.node) + sum(len(f.node) for f in model.functions)
    every = tensors if tensors is not None else external.iter_tensors(model)
    return sum(external.payload_bytes(t) for t in every) + 1024 * nodes


def _tensors(model: onnx.ModelProto) -> tuple[list[onnx.TensorProto], list[onnx.TensorProto]]:
    """Every tensor of ``model`` (one walk), and those that are not main-graph initializers
    (:func:`~bnfuse.onnx.external.iter_tensors` yields those first)."""
    every = list(external.iter_tensors(model))
    return every, every[len(model.graph.initializer) :]


@dataclass(eq=False)
class OnnxModel:
    """A model as the backend passes it around: the ModelProto, the store of its
    placeholder tensors (see :mod:`bnfuse.onnx.payloads`), and the file it was read from
    while it is unchanged (onnxruntime then loads that file instead of a copy).

    :meth:`OnnxBackend.complete` turns it into an ordinary, complete ModelProto.
    """

    proto: onnx.ModelProto
    payloads: Payloads | None = None
    source: Path | None = None
    #: (nodes, BN nodes, parameters), counted once (the backend never changes a model it
    #: has handed out; an in-place fold makes a new OnnxModel)
    counts: tuple[int, int, int] | None = None


def _wrap(model: onnx.ModelProto | OnnxModel) -> OnnxModel:
    return model if isinstance(model, OnnxModel) else OnnxModel(model)


class _ModelFile:
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


def _session_source(model: OnnxModel) -> tuple[str | bytes, _ModelFile | None]:
    """What to hand onnxruntime: the unchanged file the model came from, the serialized
    bytes, or (from :data:`RUN_FROM_FILE_THRESHOLD` on) a temporary file with external
    data. onnxruntime holds the weights from then on: the pages of mapped input files
    this process touched are let go (:meth:`Payloads.release_pages`)."""
    source: str | bytes
    tmp = None
    every, nested = _tensors(model.proto)
    size = model_bytes(model.proto, every)
    if model.source is not None:
        source = str(model.source)
    elif size < RUN_FROM_FILE_THRESHOLD and size < FILE_PATH_THRESHOLD:
        source = serialize.to_bytes(model.proto, model.payloads, nested)
    else:
        tmp = _ModelFile(model.proto, model.payloads)
        source = str(tmp.path)
    if model.payloads is not None:
        model.payloads.release_pages()
    return source, tmp


#: Files from this size on are memory-mapped instead of read: the weights then stay in
#: the page cache (no copy, no fresh memory to fault in: reading 100 MB costs ~40 ms on
#: a small VM, mapping it ~1 ms). The mapping is read-only; the input is never changed.
MMAP_THRESHOLD = 1 << 20


#: Files from this size on are cut by :func:`bnfuse.onnx.wire.split` (large weights
#: stay in the file's bytes); smaller ones are parsed whole, which protobuf's C parser
#: does faster than the scan (20 KB: 3 us against 70 us) and costs no memory to speak of.
SPLIT_THRESHOLD = 1 << 20


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
    placeholders (:func:`bnfuse.onnx.wire.split`) when the bytes allow it."""
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


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def _count(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(nodes, BN nodes, parameters) over the main graph, subgraphs and functions."""
    nodes = bns = params = 0

    def walk(graph: onnx.GraphProto) -> None:
        nonlocal nodes, bns, params
        params += sum(math.prod(t.dims) for t in graph.initializer)
        ops = [n.op_type for n in graph.node]
        nodes += len(ops)
        bns += sum(op in NORM_OPS for op in ops)
        for n in graph.node:
            standard = n.domain in ("", "ai.onnx")
            if (standard and n.op_type not in SUBGRAPH_OPS and n.op_type != "Constant") or (
                not n.attribute
            ):
                continue  # only these standard ops hold a graph or a weight
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and n.op_type == "Constant":
                    params += math.prod(a.t.dims)
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        walk(sub)

    walk(model.graph)
    for f in model.functions:
        nodes += len(f.node)
        bns += sum(n.op_type in NORM_OPS for n in f.node)
    return nodes, bns, params


def _elem_dtype(elem_type: int) -> np.dtype[Any]:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return np.dtype(np.float32)


class OrtRunner:
    """Runs a model in onnxruntime on the CPU with graph optimizations disabled."""

    runtime = "onnxruntime CPU, ORT_DISABLE_ALL"

    def __init__(
        self,
        model: onnx.ModelProto | OnnxModel,
        level: str = "ORT_DISABLE_ALL",
        threads: int = 1,
    ):
        """``model``: a ModelProto, or an :class:`OnnxModel` (run from its source file
        while it has one)."""
        data, self._file = _session_source(_wrap(model))
        self.loaded_from_path = isinstance(data, str)
        try:
            self.session = _cpu_session(data, level, threads)
        except Exception as exc:
            raise UnsupportedModelError(
                f"onnxruntime cannot load the model: {first_line(exc)}"
            ) from None
        self._inputs = [
            InputSpec(i.name, _ort_dtype(i.type), tuple(_dim(d) for d in i.shape))
            for i in self.session.get_inputs()
        ]
        self._outputs = [o.name for o in self.session.get_outputs()]
        # float16 weights between float32 inputs and outputs (see bnfuse.validate)
        self.compute_dtype = _compute_dtype(_wrap(model).proto.graph)

    @property
    def inputs(self) -> Sequence[InputSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, dict(feeds)))


def _compute_dtype(graph: onnx.GraphProto) -> str | None:
    """The coarsest float type among the graph's initializers, Constants and Cast targets."""
    from bnfuse.validate import coarsest_float

    types = {t.data_type for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to":
                types.add(a.i)
            elif node.op_type == "Constant" and a.name == "value":
                types.add(a.t.data_type)
    names = []
    for t in types:
        try:
            names.append(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).name)
        except (KeyError, TypeError, ValueError):
            continue
    return coarsest_float(names)


def _dim(d: Any) -> int | str | None:
    return d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None)


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _ort_dtype(t: str) -> np.dtype[Any]:
    if t == "tensor(bfloat16)":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_ORT_TYPES.get(t, np.float32))


class OnnxBackend:
    """:class:`bnfuse.backend.Backend` for ONNX models.

    :meth:`load` and :meth:`accept` return :class:`OnnxModel` objects, and :meth:`fuse`
    given one returns one: the fused model's large weights stay in its payload store
    until :meth:`save` writes them (or :meth:`complete` fills them in). Given a plain
    ModelProto, :meth:`fuse` returns a complete ModelProto.
    """

    name = "onnx"

    def __init__(self) -> None:
        # files this instance loaded models with external data from: (model path, data files)
        self._loaded: list[tuple[Path, list[str]]] = []
        # data files beside the models this instance wrote or read: {header: [data files]}
        self._data_files: dict[Path, list[Path]] = {}

    def load(self, path: Path, *, unsafe_load: bool = False) -> OnnxModel:
        """Read an ONNX file; external data is read from beside it after every location
        was checked to stay inside the model's directory."""
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
        self._check_model(model, path)
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

    def _check_model(self, model: onnx.ModelProto, path: Path | None) -> None:
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

    def accept(self, model: Any) -> OnnxModel:
        """Check an in-memory ModelProto (it is copied before any change)."""
        if not isinstance(model, onnx.ModelProto):
            raise UnsupportedModelError(f"expected an onnx.ModelProto, got {type(model).__name__}")
        self._check_model(model, None)
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

    def rule_names(self) -> tuple[str, ...]:
        return RULE_NAMES

    def fuse(self, model: onnx.ModelProto | OnnxModel, options: FuseOptions) -> PassResult:
        m = _wrap(model)
        wrapped = isinstance(model, OnnxModel)
        result, store = fuse_model(m.proto, options, m.payloads, keep_placeholders=wrapped)
        fused = result.model
        folds = ";".join(f"{f.bn}->{f.into}({f.direction})" for f in result.folds)
        _set_meta(fused, "bnfuse.version", __version__)
        _set_meta(fused, "bnfuse.folds", str(len(result.folds)))
        if folds:
            _set_meta(fused, "bnfuse.fold_list", folds[:4096])
        if wrapped:
            result.model = OnnxModel(fused, store)
        return result

    def complete(self, model: onnx.ModelProto | OnnxModel) -> onnx.ModelProto:
        """The model as an ordinary ModelProto: every placeholder filled with its data."""
        if not isinstance(model, OnnxModel):
            return model
        if model.payloads is not None:
            external.materialize(model.proto, model.payloads)
            model.payloads = None
        return model.proto

    def framework(self, model: onnx.ModelProto | OnnxModel) -> str:
        """ "ONNX opset N, IR M" and the producer the file names (exporter and version)."""
        proto = _wrap(model).proto
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        text = f"ONNX opset {opset}, IR {proto.ir_version}"
        producer = " ".join(p for p in (proto.producer_name, proto.producer_version) if p)
        return f"{text} ({producer})" if producer else text

    def stats(self, model: onnx.ModelProto | OnnxModel, path: Path | None = None) -> ModelStats:
        """Counts; the file size includes the external data files beside ``path``."""
        m = _wrap(model)
        if m.counts is None:
            m.counts = _count(m.proto)
        nodes, bns, params = m.counts
        size = None
        if path is not None and Path(path).exists():
            size = Path(path).stat().st_size
            for f in self._data_files.get(Path(path).resolve(), []) if self._data_files else ():
                if f.exists():
                    size += f.stat().st_size
        return ModelStats(nodes=nodes, bn_nodes=bns, params=params, file_size=size)

    def runner(self, model: onnx.ModelProto | OnnxModel) -> OrtRunner:
        return OrtRunner(model)

    def bench_targets(
        self,
        model: onnx.ModelProto | OnnxModel,
        threads: int,
        *,
        providers: Sequence[str] = (_providers.CPU,),
    ) -> list[BenchTarget]:
        """Both optimization levels on every provider (the CPU provider first)."""
        data, tmp = _session_source(_wrap(model))
        targets = []
        for provider in providers:
            for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
                targets.append(
                    BenchTarget(
                        runtime=_providers.label(provider, level),
                        prepare=_session_factory(data, level, threads, tmp, provider),
                        note="",
                    )
                )
        return targets

    def save(self, model: onnx.ModelProto | OnnxModel, path: Path) -> None:
        """Write atomically. A model loaded with external data, or too large for one
        protobuf, is written as ``path`` plus ``<name>.data`` beside it (relative location)."""
        path = Path(path)
        m = _wrap(model)
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


def _cpu_session(
    data: str | bytes, level: str, threads: int, provider: str = _providers.CPU
) -> Any:
    """An onnxruntime session at optimization ``level`` with ``threads`` intra-op threads,
    on the CPU provider unless another ``provider`` is named (benchmark only)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, so, providers=_providers.session_providers(provider))
    if provider != _providers.CPU:
        _providers.check_session(sess, provider)
    return sess


def _session_factory(
    data: str | bytes,
    level: str,
    threads: int,
    keep: _ModelFile | None = None,
    provider: str = _providers.CPU,
) -> Callable[[], Callable[[Mapping[str, np.ndarray]], Any]]:
    """``data``: serialized model or a path; ``keep`` holds a temporary model file alive."""

    def prepare() -> Callable[[Mapping[str, np.ndarray]], Any]:
        _alive = keep  # the temporary model file must outlive every session made here
        del _alive
        sess = _cpu_session(data, level, threads, provider)

        def run(feeds: Mapping[str, np.ndarray]) -> Any:
            return sess.run(None, dict(feeds))

        return run

    return prepare


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)
