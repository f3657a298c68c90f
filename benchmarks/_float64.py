"""A float64 evaluation of a float32 ONNX model: the reference that every tool's output is
measured against in ``benchmarks/run.py``.

:func:`to_double` rewrites a copy of the model so that every float32 tensor becomes float64:
initializers, graph inputs/outputs/value_info, ``Cast(to=FLOAT)`` targets, ``Constant``
nodes (``value`` tensors and ``value_float(s)``) and ``ConstantOfShape`` values, in the
main graph, subgraphs and local functions. Inputs that the ONNX spec types as float32 only
(``Resize``'s ``scales``) are left float32.

:class:`Float64Reference` runs the double model in onnxruntime (CPU) when it has float64
kernels for every op; onnxruntime has none for ``Conv``, ``ConvTranspose``,
``AveragePool`` or ``GlobalAveragePool``, so convolutional models fall back to
``onnx.reference.ReferenceEvaluator`` (numpy, float64 throughout; its ``Conv`` is an
im2col matmul, fast enough at batch 2 and 96x96). ``engine`` says which one ran.

The reference ``ConvTranspose`` is wrong for ``group > 1`` in onnx 1.23 (it slices the
weight along its output channels and writes one channel per group), and slow
(a Python loop per output channel), so it is replaced by :func:`conv_transpose`, a
vectorized numpy implementation (the reference's own code, called once per group, only
when the output shape is implicit through ``auto_pad``/``output_shape``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["Float64Reference", "to_double"]

_F32, _F64 = TensorProto.FLOAT, TensorProto.DOUBLE
#: (op_type, input index) that the spec types as float32 only: keep them float32.
_FLOAT32_ONLY = {("Resize", 2), ("Upsample", 1)}


def _double_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float64)
    out = numpy_helper.from_array(arr, t.name)
    out.doc_string = t.doc_string
    return out


def _retype(vis: Iterable[onnx.ValueInfoProto]) -> None:
    for vi in vis:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type == _F32:
            tt.elem_type = _F64


def _float32_only_inputs(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    keep = set()
    for n in nodes:
        for op, i in _FLOAT32_ONLY:
            if n.op_type == op and len(n.input) > i and n.input[i]:
                keep.add(n.input[i])
    return keep


def _graph(g: onnx.GraphProto) -> None:
    keep = _float32_only_inputs(g.node)
    for i, t in enumerate(g.initializer):
        if t.data_type == _F32 and t.name not in keep:
            g.initializer[i].CopyFrom(_double_tensor(t))
    _retype(g.input)
    _retype(g.output)
    _retype(g.value_info)
    _nodes(g.node, keep)


def _nodes(nodes: Iterable[onnx.NodeProto], keep: set[str]) -> None:
    for n in nodes:
        if n.op_type == "Cast" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "to" and a.i == _F32 and n.output[0] not in keep:
                    a.i = _F64
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output[0] not in keep:
            for a in list(n.attribute):
                if a.name == "value" and a.t.data_type == _F32:
                    a.t.CopyFrom(_double_tensor(a.t))
                elif a.name in ("value_float", "value_floats"):
                    vals = np.asarray(a.f if a.name == "value_float" else list(a.floats))
                    n.attribute.remove(a)
                    n.attribute.append(
                        onnx.helper.make_attribute("value", numpy_helper.from_array(vals))
                    )
        if n.op_type == "ConstantOfShape":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == _F32:
                    a.t.CopyFrom(_double_tensor(a.t))
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _graph(sub)


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float32 tensor made float64 (see the module doc)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _graph(m.graph)
    for f in m.functions:
        _nodes(f.node, _float32_only_inputs(f.node))
    return m


def conv_transpose(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    group: int,
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    output_padding: Sequence[int],
) -> np.ndarray:
    """ONNX ConvTranspose with explicit pads (any rank, any group), vectorized in numpy.

    For every kernel position, the per-group channel contraction of ``x`` is added at the
    strided output positions it reaches; the full result is then cropped by ``pads``.
    """
    n, cin = x.shape[:2]
    spatial = x.shape[2:]
    k = w.shape[2:]
    cg, mg = cin // group, w.shape[1]
    rank = len(spatial)
    full = [(spatial[i] - 1) * strides[i] + (k[i] - 1) * dilations[i] + 1 for i in range(rank)]
    ext = [full[i] + output_padding[i] for i in range(rank)]
    y = np.zeros((n, group, mg, *ext), dtype=np.float64)
    xg = x.reshape(n, group, cg, *spatial)
    wg = w.reshape(group, cg, mg, *k)
    taps = wg.reshape(group, cg, mg, -1)
    for i_tap, pos in enumerate(itertools.product(*(range(d) for d in k))):
        contrib = np.einsum("ngc...,gcm->ngm...", xg, taps[:, :, :, i_tap])
        where = tuple(
            slice(pos[i] * dilations[i], pos[i] * dilations[i] + (spatial[i] - 1) * strides[i] + 1,
                  strides[i])
            for i in range(rank)
        )  # fmt: skip
        y[(slice(None), slice(None), slice(None), *where)] += contrib
    crop = tuple(slice(pads[i], ext[i] - pads[i + rank]) for i in range(rank))
    out = y.reshape(n, group * mg, *ext)[(slice(None), slice(None), *crop)]
    if b is not None:
        out = out + b.reshape(1, -1, *([1] * rank))
    return np.ascontiguousarray(out)


def _conv_transpose_op() -> type:
    """``ConvTranspose`` for the ReferenceEvaluator: :func:`conv_transpose` when the pads
    are explicit, the reference's own implementation (one ungrouped call per group)
    otherwise."""
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as _Ref

    class ConvTranspose(_Ref):  # type: ignore[misc]
        op_domain = ""

        def _run(  # type: ignore[override]
            self, X: Any, W: Any, B: Any = None, **kw: Any
        ) -> tuple[np.ndarray]:
            group = int(kw.get("group") or 1)
            rank = X.ndim - 2
            auto_pad = kw.get("auto_pad")
            if isinstance(auto_pad, bytes):
                auto_pad = auto_pad.decode()
            if kw.get("output_shape") is None and auto_pad in (None, "NOTSET", "VALID"):
                pads = kw.get("pads")
                if pads is None or auto_pad == "VALID":
                    pads = [0] * (2 * rank)
                y = conv_transpose(
                    X,
                    W,
                    B,
                    group,
                    kw.get("strides") or [1] * rank,
                    kw.get("dilations") or [1] * rank,
                    pads,
                    kw.get("output_padding") or [0] * rank,
                )
                return (y.astype(X.dtype),)
            if group == 1:
                return _Ref._run(self, X, W, B, **kw)  # type: ignore[no-any-return]
            c, m = X.shape[1] // group, W.shape[1]
            kw["group"] = 1
            outs = [
                _Ref._run(
                    self,
                    X[:, g * c : (g + 1) * c],
                    W[g * c : (g + 1) * c],
                    None if B is None else B[g * m : (g + 1) * m],
                    **kw,
                )[0]
                for g in range(group)
            ]
            return (np.concatenate(outs, axis=1),)

    return ConvTranspose


class Float64Reference:
    """Evaluates the float64 twin of a float32 model; ``engine`` names the runtime used."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = to_double(model)
        self.engine = "onnxruntime CPU (float64 kernels), ORT_DISABLE_ALL"
        self.fallback_reason = ""
        self._sess: Any = None
        self._ref: Any = None
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            self._sess = ort.InferenceSession(
                self.model.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # no float64 kernel for some op (Conv, ...)
            text = str(exc).strip().splitlines()
            self.fallback_reason = text[0][:200] if text else type(exc).__name__
            from onnx.reference import ReferenceEvaluator

            self._ref = ReferenceEvaluator(self.model, new_ops=[_conv_transpose_op()])
            self.engine = "onnx.reference.ReferenceEvaluator (numpy float64)"

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``feeds`` (float inputs are cast to float64)."""
        cast = {
            k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in feeds.items()
        }
        if self._sess is not None:
            return [np.asarray(y) for y in self._sess.run(None, cast)]
        # the reference Sigmoid evaluates both branches of its np.where: overflow is benign
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return [np.asarray(y) for y in self._ref.run(None, cast)]
