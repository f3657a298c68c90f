"""Hand-built ONNX models in the shapes other exporters write, for ``sweep.py``.

Each builder returns a fresh ``onnx.ModelProto`` with a symbolic batch ``N``, random
weights and non-identity BN statistics (fixed seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfuse.onnx.count import count_affine_nodes

F = TensorProto.FLOAT


def _finish(m: onnx.ModelProto) -> onnx.ModelProto:
    """Give the graph outputs the types shape inference finds (the checker wants them)."""
    m.ir_version = min(m.ir_version, 8)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type for v in inferred.graph.value_info}
    types.update(
        {v.name: v.type for v in inferred.graph.output if v.type.tensor_type.HasField("shape")}
    )
    for out in m.graph.output:
        if out.name in types:
            out.type.CopyFrom(types[out.name])
    onnx.checker.check_model(m)
    return m


def bn_count(path: Path) -> int:
    """BatchNormalization nodes plus BN-equivalent Mul/Add nodes next to a linear layer."""
    counts = count_affine_nodes(onnx.load(str(path), load_external_data=False))
    return int(counts["BatchNormalization"] + counts["affine"])


class G:
    """A tiny graph builder: initializers with random values, nodes, one input/output."""

    def __init__(self, seed: int, dtype: type = np.float32, prefix: str = "") -> None:
        self.p = prefix
        self.r = np.random.default_rng(seed)
        self.dtype = dtype
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.n = 0

    def w(self, name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        name = self.p + name
        self.inits.append(
            numpy_helper.from_array(self.r.normal(0, scale, shape).astype(self.dtype), name)
        )
        return name

    def node(self, op: str, ins: list[str], **attrs: Any) -> str:
        self.n += 1
        out = f"{self.p}{op.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"{self.p}{op}_{self.n}", **attrs))
        return out

    def bn(self, x: str, c: int, **attrs: Any) -> str:
        k = self.n + 1
        r = self.r
        vals = {
            "s": r.uniform(0.5, 2.0, c) * r.choice([-1, 1], c),
            "b": r.normal(0, 1, c),
            "m": r.normal(0, 1, c),
            "v": r.uniform(0.2, 3.0, c),
        }
        names = []
        for key, v in vals.items():
            name = f"{self.p}bn{k}_{key}"
            self.inits.append(numpy_helper.from_array(v.astype(self.dtype), name))
            names.append(name)
        return self.node("BatchNormalization", [x, *names], epsilon=1e-3, **attrs)

    def graph(
        self, name: str, x_shape: list[str | int | None], y: str, elem: int = F
    ) -> onnx.GraphProto:
        x = helper.make_tensor_value_info("x", elem, x_shape)
        out = helper.make_tensor_value_info(y, elem, None)
        return helper.make_graph(self.nodes, name, [x], [out], self.inits)

    def model(
        self, name: str, x_shape: list[str | int | None], y: str, opset: int = 17, elem: int = F
    ) -> onnx.ModelProto:
        m = helper.make_model(
            self.graph(name, x_shape, y, elem), opset_imports=[helper.make_opsetid("", opset)]
        )
        return _finish(m)


def torch_style() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv(no bias) -> BN -> Relu -> GAP -> Flatten -> Gemm (NCHW)."""
    g = G(1)
    h = g.node("Conv", ["x", g.w("c1w", (8, 3, 3, 3)), g.w("c1b", (8,))], pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.bn(h, 8)])
    h = g.node("Conv", [h, g.w("c2w", (16, 8, 3, 3))], strides=[2, 2], pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.bn(h, 16)])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])])
    y = g.node("Gemm", [h, g.w("fw", (10, 16)), g.w("fb", (10,))], transB=1)
    return g.model("torch_style", ["N", 3, 16, 16], y)


def _bn_opset(opset: int) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        g = G(opset)
        h = g.node("Conv", ["x", g.w("cw", (6, 3, 3, 3)), g.w("cb", (6,))])
        attrs: dict[str, Any] = {"spatial": 1} if opset == 7 else {}
        y = g.bn(h, 6, **attrs)
        return g.model(f"bn_opset{opset}", ["N", 3, 8, 8], y, opset=opset)

    return make


def fp16() -> onnx.ModelProto:
    g = G(2, np.float16)
    h = g.node("Conv", ["x", g.w("cw", (6, 3, 3, 3)), g.w("cb", (6,))])
    y = g.bn(g.node("Relu", [g.bn(h, 6)]), 6)
    return g.model("fp16", ["N", 3, 8, 8], y, elem=TensorProto.FLOAT16)


def fp16_keep_io() -> onnx.ModelProto:
    """float16 weights between Casts from/to float32 (what onnxconverter-common's
    ``convert_float_to_float16(keep_io_types=True)`` writes): float32 outputs computed in
    float16."""
    g = G(9, np.float16)
    h = g.node("Cast", ["x"], to=TensorProto.FLOAT16)
    h = g.node("Conv", [h, g.w("cw", (8, 3, 3, 3)), g.w("cb", (8,))])
    h = g.node("Relu", [g.bn(h, 8)])
    h = g.node("Flatten", [h])
    h = g.node("Gemm", [h, g.w("fw", (10, 8 * 14 * 14)), g.w("fb", (10,))], transB=1)
    y = g.node("Cast", [h], to=TensorProto.FLOAT)
    return g.model("fp16_keep_io", ["N", 3, 16, 16], y)


def double_gemm() -> onnx.ModelProto:
    g = G(3, np.float64)
    h = g.node("Gemm", ["x", g.w("fw", (12, 8)), g.w("fb", (12,))], transB=1)
    h = g.node("Relu", [g.bn(h, 12)])
    y = g.node("MatMul", [g.bn(h, 12), g.w("mw", (12, 4))])
    return g.model("double_gemm", ["N", 8], y, elem=TensorProto.DOUBLE)


def conv1d() -> onnx.ModelProto:
    g = G(4)
    h = g.node("Conv", ["x", g.w("cw", (8, 4, 3)), g.w("cb", (8,))], pads=[1, 1], dilations=[2])
    h = g.node("Relu", [g.bn(h, 8)])
    y = g.node("Conv", [g.bn(h, 8), g.w("c2", (5, 8, 1))])
    return g.model("conv1d", ["N", 4, 20], y)


def conv3d() -> onnx.ModelProto:
    g = G(5)
    h = g.node("Conv", ["x", g.w("cw", (6, 2, 3, 3, 3)), g.w("cb", (6,))], pads=[1] * 6)
    h = g.node("Relu", [g.bn(h, 6)])
    y = g.node("Conv", [g.bn(h, 6), g.w("c2", (4, 6, 1, 1, 1))])
    return g.model("conv3d", ["N", 2, 5, 6, 7], y)


def conv_transpose() -> onnx.ModelProto:
    """ConvTranspose with group, strides, dilations, output_padding (PyTorch decoders)."""
    g = G(6)
    h = g.node(
        "ConvTranspose",
        ["x", g.w("tw", (4, 3, 3, 3)), g.w("tb", (6,))],
        group=2,
        strides=[2, 2],
        dilations=[2, 1],
        output_padding=[1, 1],
        pads=[1, 0, 1, 1],
    )
    h = g.node("Relu", [g.bn(h, 6)])
    y = g.node("ConvTranspose", [g.bn(h, 6), g.w("t2", (6, 2, 2, 2))], group=2, strides=[2, 2])
    return g.model("conv_transpose", ["N", 4, 5, 5], y)


def matmul_batched() -> onnx.ModelProto:
    """MatMul on [N, 4, 16] (a sequence): BN's channel axis 1 is the sequence axis, not the
    MatMul's output features, so no per-feature fold applies; a fold must be exact."""
    g = G(7)
    h = g.node("MatMul", ["x", g.w("mw", (16, 8))])
    h = g.bn(h, 4)
    y = g.node("MatMul", [g.node("Relu", [h]), g.w("m2", (8, 3))])
    return g.model("matmul_batched", ["N", 4, 16], y)


def bn_flatten_gemm() -> onnx.ModelProto:
    g = G(8)
    h = g.node("Conv", ["x", g.w("cw", (4, 3, 3, 3))])
    h = g.bn(g.node("Relu", [h]), 4)
    h = g.node("Flatten", [h], axis=1)
    y = g.node("Gemm", [h, g.w("fw", (10, 4 * 6 * 6)), g.w("fb", (10,))], transB=1)
    return g.model("bn_flatten_gemm", ["N", 3, 8, 8], y)


def _branch(seed: int, name: str) -> onnx.GraphProto:
    g = G(seed, prefix=f"{name}_")
    h = g.node("Conv", ["x", g.w("w", (5, 3, 3, 3)), g.w("b", (5,))])
    y = g.bn(h, 5)
    out = helper.make_tensor_value_info(y, F, None)
    return helper.make_graph(g.nodes, name, [], [out], g.inits)


def bn_in_if() -> onnx.ModelProto:
    """Conv -> BN inside both branches of an If (outer-scope x)."""
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="if",
        then_branch=_branch(10, "then"),
        else_branch=_branch(11, "else"),
    )
    x = helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", F, None)
    graph = helper.make_graph([node], "bn_in_if", [x], [y], [cond])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _finish(m)


def bn_in_loop() -> onnx.ModelProto:
    """A Loop whose body carries x through Conv -> BN -> Relu three times."""
    g = G(12)
    h = g.node("Conv", ["h_in", g.w("lw", (3, 3, 3, 3)), g.w("lb", (3,))], pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.bn(h, 3)])
    cond_out = g.node("Identity", ["cond_in"])
    body = helper.make_graph(
        g.nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", F, None),
        ],
        [
            helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
            helper.make_tensor_value_info(h, F, [None, 3, 6, 6]),
        ],
        g.inits,
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)
    x = helper.make_tensor_value_info("x", F, ["N", 3, 6, 6])
    y = helper.make_tensor_value_info("y", F, ["N", 3, 6, 6])
    m = helper.make_model(
        helper.make_graph([loop], "bn_in_loop", [x], [y], [trip, cond]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    return _finish(m)


HAND_BUILT: dict[str, Callable[[], onnx.ModelProto]] = {
    "torch_style": torch_style,
    "bn_opset7_spatial": _bn_opset(7),
    "bn_opset9": _bn_opset(9),
    "bn_opset14": _bn_opset(14),
    "fp16": fp16,
    "fp16_keep_io": fp16_keep_io,
    "double_gemm": double_gemm,
    "conv1d": conv1d,
    "conv3d": conv3d,
    "convT_group_dil_outpad": conv_transpose,
    "matmul_batched": matmul_batched,
    "bn_flatten_gemm": bn_flatten_gemm,
    "bn_in_if": bn_in_if,
    "bn_in_loop": bn_in_loop,
}
