"""Builders and runners shared by the ONNX tests (models are made in code, never downloaded)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def bn_params(c: int, r: np.random.Generator, dtype: Any = np.float32) -> list[np.ndarray]:
    """Randomized BN statistics (never the identity defaults)."""
    return [
        r.uniform(0.5, 2.0, c).astype(dtype) * r.choice([-1, 1], c).astype(dtype),  # gamma
        r.normal(0, 1, c).astype(dtype),  # beta
        r.normal(0, 1, c).astype(dtype),  # mean
        r.uniform(0.2, 3.0, c).astype(dtype),  # var
    ]


class GraphBuilder:
    """Tiny helper to assemble ONNX graphs in tests."""

    def __init__(self, seed: int = 0, dtype: int = FLOAT) -> None:
        self.r = rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.dtype = dtype
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def input(self, name: str, shape: Sequence[int | str | None], dtype: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype or self.dtype, list(shape)))
        return name

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def weight(self, shape: Sequence[int], base: str = "W", scale: float = 0.5) -> str:
        return self.const((self.r.normal(0, scale, shape)).astype(self.np_dtype), base)

    def node(
        self, op: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None, **attrs: Any
    ) -> str:
        nm = name or self.name(op.lower())
        outs = [f"{nm}_out"] + [f"{nm}_out{i}" for i in range(1, n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=nm, **attrs))
        return outs[0]

    def bn(self, x: str, c: int, eps: float = 1e-5, name: str | None = None, **attrs: Any) -> str:
        params = [self.const(p.astype(self.np_dtype), "bnp") for p in bn_params(c, self.r)]
        return self.node(
            "BatchNormalization", [x, *params], name=name or self.name("bn"), epsilon=eps, **attrs
        )

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: Sequence[int],
        group: int = 1,
        bias: bool = True,
        **attrs: Any,
    ) -> str:
        w = self.weight([cout, cin // group, *k])
        ins = [x, w] + (
            [self.const(self.r.normal(0, 1, cout).astype(self.np_dtype), "b")] if bias else []
        )
        return self.node("Conv", ins, group=group, **attrs)

    def output(
        self, name: str, shape: Sequence[int | str | None] | None = None, dtype: int | None = None
    ) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype or self.dtype, shape))

    def model(self, opset: int = 17, ir_version: int | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir_version or min(m.ir_version, 10)
        try:  # give outputs declared without a shape the inferred one
            inferred = onnx.shape_inference.infer_shapes(m)
            known = {
                v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)
            }
            for out in m.graph.output:
                if not out.type.tensor_type.HasField("shape") and out.name in known:
                    out.type.CopyFrom(known[out.name].type)
        except Exception:
            pass
        return m


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime with graph optimizations DISABLED (ORT would fold Conv+BN itself)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return list(sess.run(None, feeds))


def random_feeds(model: onnx.ModelProto, seed: int = 1, batch: int = 2) -> dict[str, np.ndarray]:
    r = rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = r.normal(0, 1, shape).astype(dt)
    return feeds


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def assert_close(
    a: onnx.ModelProto, b: onnx.ModelProto, rtol: float = 1e-4, atol: float = 1e-5, seed: int = 1
) -> None:
    feeds = random_feeds(a, seed)
    ra, rb = ort_run(a, feeds), ort_run(b, feeds)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(x64))))
        np.testing.assert_allclose(y64, x64, rtol=rtol, atol=atol * scale)


def corrupt_backward_folds(monkeypatch: Any, hit: Callable[[np.ndarray], bool]) -> list[int]:
    """Make every backward fold whose weight satisfies ``hit`` wrong by 5% (the folded
    weight scaled by 1.05); returns a log with one entry per corrupted fold."""
    import bnfuse.fold
    import bnfuse.onnx.rules as rules

    hits: list[int] = []
    original: Callable[..., Any] = bnfuse.fold.fold_backward

    def corrupted(w: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        w2, b2 = original(w, *args, **kwargs)
        if hit(w):
            hits.append(1)
            w2 = (w2 * np.float32(1.05)).astype(w2.dtype)
        return w2, b2

    monkeypatch.setattr(bnfuse.fold, "fold_backward", corrupted)
    if hasattr(rules, "fold_backward"):  # imported by name there
        monkeypatch.setattr(rules, "fold_backward", corrupted)
    return hits
