"""The ONNX backend: load, fuse, count, run (onnxruntime), time, save."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfuse import __version__
from bnfuse.backend import BenchTarget, FuseOptions, InputSpec, PassResult, atomic_path
from bnfuse.errors import ModelLoadError, UnsupportedModelError, UsageError, first_line
from bnfuse.onnx import external, serialize
from bnfuse.onnx.fuse import RULE_NAMES, fuse_model
from bnfuse.result import ModelStats

__all__ = ["FILE_PATH_THRESHOLD", "OnnxBackend", "OrtRunner", "model_bytes"]

NORM_OPS = ("BatchNormalization",)

#: From this many bytes (weights, estimated without serializing) on, a model is saved with
#: its weights in an external data file and handed to onnxruntime as a file path: protobuf
#: cannot serialize a message of 2 GiB or more. Tests lower it to exercise that path.
FILE_PATH_THRESHOLD = 2_000_000_000


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's approximate serialized size: its tensors' payloads plus 1 KiB a node.

    (``ByteSize()`` would serialize the whole model to count.)
    """
    nodes = len(model.graph.node) + sum(len(f.node) for f in model.functions)
    return sum(external.payload_bytes(t) for t in external.iter_tensors(model)) + 1024 * nodes


def _large(model: onnx.ModelProto) -> bool:
    return model_bytes(model) >= FILE_PATH_THRESHOLD


class _ModelFile:
    """A model written to a private temporary directory (header + external data) so that
    onnxruntime can load it from a path; the directory goes when this object does."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bnfuse-ort-")
        self.path = Path(self._dir.name) / "model.onnx"
        external.write_model(
            model, self.path, self.path.with_name("model.onnx.data"), "model.onnx.data"
        )

    def cleanup(self) -> None:
        self._dir.cleanup()


def _session_source(
    model: onnx.ModelProto, source: Path | None
) -> tuple[str | bytes, _ModelFile | None]:
    """What to hand onnxruntime: the bytes, or a path for a model too large for bytes."""
    if not _large(model):
        return serialize.to_bytes(model), None
    if source is not None:
        return str(source), None
    tmp = _ModelFile(model)
    return str(tmp.path), tmp


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def _count(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(nodes, BN nodes, parameters) over the main graph, subgraphs and functions."""
    nodes = bns = params = 0

    def walk(graph: onnx.GraphProto) -> None:
        nonlocal nodes, bns, params
        for t in graph.initializer:
            params += math.prod(t.dims)
        for n in graph.node:
            nodes += 1
            bns += n.op_type in NORM_OPS
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        params += math.prod(a.t.dims)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
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
        model: onnx.ModelProto,
        level: str = "ORT_DISABLE_ALL",
        threads: int = 1,
        source: Path | None = None,
    ):
        """``source``: the file ``model`` was loaded from, unchanged (used for large models
        instead of writing a temporary copy)."""
        data, self._file = _session_source(model, source)
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

    @property
    def inputs(self) -> Sequence[InputSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, dict(feeds)))


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
    """:class:`bnfuse.backend.Backend` for ONNX models."""

    name = "onnx"

    def __init__(self) -> None:
        # models this instance loaded from files with external data: (model, path, files)
        self._loaded: list[tuple[onnx.ModelProto, Path, list[str]]] = []
        # data files beside the models this instance wrote or read: {header: [data files]}
        self._data_files: dict[Path, list[Path]] = {}

    def _source_of(self, model: onnx.ModelProto) -> Path | None:
        return next((p for m, p, _ in self._loaded if m is model), None)

    def load(self, path: Path, *, unsafe_load: bool = False) -> onnx.ModelProto:
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
            if path.stat().st_size == 0:
                raise ModelLoadError(f"{path}: empty file, not an ONNX model")
            model = onnx.load(str(path), load_external_data=False)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a readable ONNX model ({first_line(exc, 200)})"
            ) from None
        self._check_model(model, path)
        try:
            files = external.load_external(model, path)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: cannot read external data ({first_line(exc, 200)})"
            ) from None
        reason = external.check_payloads(model)
        if reason:
            raise ModelLoadError(f"{path}: damaged ONNX model ({reason})")
        if files:
            self._loaded.append((model, path, files))
            self._data_files[path.resolve()] = [Path(f) for f in files]
        return model

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

    def accept(self, model: Any) -> onnx.ModelProto:
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
        return model

    def rule_names(self) -> tuple[str, ...]:
        return RULE_NAMES

    def fuse(self, model: onnx.ModelProto, options: FuseOptions) -> PassResult:
        result = fuse_model(model, options)
        fused = result.model
        folds = ";".join(f"{f.bn}->{f.into}({f.direction})" for f in result.folds)
        _set_meta(fused, "bnfuse.version", __version__)
        _set_meta(fused, "bnfuse.folds", str(len(result.folds)))
        if folds:
            _set_meta(fused, "bnfuse.fold_list", folds[:4096])
        return result

    def stats(self, model: onnx.ModelProto, path: Path | None = None) -> ModelStats:
        """Counts; the file size includes the external data files beside ``path``."""
        nodes, bns, params = _count(model)
        size = None
        if path is not None and Path(path).exists():
            size = Path(path).stat().st_size
            for f in self._data_files.get(Path(path).resolve(), []):
                if f.exists():
                    size += f.stat().st_size
        return ModelStats(nodes=nodes, bn_nodes=bns, params=params, file_size=size)

    def runner(self, model: onnx.ModelProto) -> OrtRunner:
        return OrtRunner(model, source=self._source_of(model))

    def bench_targets(self, model: onnx.ModelProto, threads: int) -> list[BenchTarget]:
        data, tmp = _session_source(model, self._source_of(model))
        targets = []
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            targets.append(
                BenchTarget(
                    runtime=f"onnxruntime {level}",
                    prepare=_session_factory(data, level, threads, tmp),
                    note="",
                )
            )
        return targets

    def save(self, model: onnx.ModelProto, path: Path) -> None:
        """Write atomically. A model loaded with external data, or too large for one
        protobuf, is written as ``path`` plus ``<name>.data`` beside it (relative location)."""
        path = Path(path)
        if external.uses_external_data(model):
            raise UnsupportedModelError(
                "the model refers to external data that was never loaded; cannot save it"
            )
        if self._loaded or _large(model):
            data = path.with_name(external.data_name(path)).resolve()
            for _, src, files in self._loaded:
                if str(data) in {os.path.realpath(f) for f in files}:
                    raise UsageError(
                        f"{path}: writing {data.name} would overwrite the external data of "
                        f"the input model {src}; choose another output name"
                    )
            written = external.save_with_external_data(model, path)
            self._data_files[path.resolve()] = [written]
            return
        with atomic_path(path) as tmp:
            serialize.write(model, tmp)
        self._data_files.pop(path.resolve(), None)


def _cpu_session(data: str | bytes, level: str, threads: int) -> Any:
    """An onnxruntime CPU session at optimization ``level`` with ``threads`` intra-op threads."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _session_factory(
    data: str | bytes, level: str, threads: int, keep: _ModelFile | None = None
) -> Callable[[], Callable[[Mapping[str, np.ndarray]], Any]]:
    """``data``: serialized model or a path; ``keep`` holds a temporary model file alive."""

    def prepare() -> Callable[[Mapping[str, np.ndarray]], Any]:
        _alive = keep  # the temporary model file must outlive every session made here
        del _alive
        sess = _cpu_session(data, level, threads)

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
