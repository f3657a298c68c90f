"""The ONNX backend: load, fuse, count, run (onnxruntime), time, save."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfuse import __version__
from bnfuse import providers as _providers
from bnfuse.backend import BenchTarget, FuseOptions, InputSpec, PassResult
from bnfuse.errors import UnsupportedModelError, first_line
from bnfuse.onnx.fuse import RULE_NAMES, fuse_model
from bnfuse.onnx.graph import SUBGRAPH_OPS, subgraphs
from bnfuse.onnx.storage import ModelFiles, OnnxModel, TempModelFile, session_source, wrap
from bnfuse.onnx.storage import complete as _complete
from bnfuse.result import ModelStats

__all__ = ["OnnxBackend", "OnnxModel", "OrtRunner"]

NORM_OPS = ("BatchNormalization",)


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
            if n.op_type == "Constant":
                params += sum(
                    math.prod(a.t.dims) for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
                )
            for sub in subgraphs(n):
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
        data, self._file = session_source(model)
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
        self.compute_dtype = _compute_dtype(wrap(model).proto.graph)

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
        self._files = ModelFiles()

    def load(self, path: Path, *, unsafe_load: bool = False) -> OnnxModel:
        """Read an ONNX file (see :meth:`bnfuse.onnx.storage.ModelFiles.load`)."""
        return self._files.load(path)

    def accept(self, model: Any) -> OnnxModel:
        """Check an in-memory ModelProto (it is copied before any change)."""
        return self._files.accept(model)

    def rule_names(self) -> tuple[str, ...]:
        return RULE_NAMES

    def fuse(self, model: onnx.ModelProto | OnnxModel, options: FuseOptions) -> PassResult:
        m = wrap(model)
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
        return _complete(model)

    def framework(self, model: onnx.ModelProto | OnnxModel) -> str:
        """ "ONNX opset N, IR M" and the producer the file names (exporter and version)."""
        proto = wrap(model).proto
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        text = f"ONNX opset {opset}, IR {proto.ir_version}"
        producer = " ".join(p for p in (proto.producer_name, proto.producer_version) if p)
        return f"{text} ({producer})" if producer else text

    def stats(self, model: onnx.ModelProto | OnnxModel, path: Path | None = None) -> ModelStats:
        """Counts; the file size includes the external data files beside ``path``."""
        m = wrap(model)
        if m.counts is None:
            m.counts = _count(m.proto)
        nodes, bns, params = m.counts
        size = self._files.size(Path(path)) if path is not None else None
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
        data, tmp = session_source(model)
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
        self._files.save(model, path)


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
    keep: TempModelFile | None = None,
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
