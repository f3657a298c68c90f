"""Benchmark ONNX models, built in code (no downloads) with randomized BN statistics.

Every builder returns a fresh, checked :class:`onnx.ModelProto`; the same name always
builds the same model (fixed seeds). ``MODELS`` lists them all, ``QUICK`` a small subset
that runs in seconds. Import from other benchmark scripts::

    from models import MODELS, QUICK, build   # with benchmarks/ on sys.path

Conventions: opset 17, float32, a symbolic batch dimension ``N``, He-scaled weights and
BN statistics drawn so that no BatchNormalization is an identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODELS", "QUICK", "Builder", "build", "describe"]

OPSET = 17
IR_VERSION = 8


class Builder:
    """Accumulates nodes and initializers of one graph; names are unique and readable."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.r = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count: dict[str, int] = {}

    def uid(self, base: str) -> str:
        self._count[base] = self._count.get(base, 0) + 1
        return f"{base}_{self._count[base]}"

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def output(self, name: str) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def const(self, arr: np.ndarray, base: str) -> str:
        name = self.uid(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: Sequence[str], base: str | None = None, **attrs: Any) -> str:
        name = self.uid(base or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def weight(self, shape: Sequence[int], fan_in: int, base: str) -> str:
        std = np.sqrt(2.0 / max(1, fan_in))
        return self.const(self.r.normal(0, std, shape).astype(np.float32), base)

    def bias(self, n: int, base: str) -> str:
        return self.const(self.r.normal(0, 0.1, n).astype(np.float32), base)

    # ---- layers ---------------------------------------------------------------------
    def bn(self, x: str, c: int, eps: float = 1e-5) -> str:
        r = self.r
        params = [
            r.uniform(0.5, 1.5, c) * r.choice([-1.0, 1.0], c, p=[0.1, 0.9]),  # gamma
            r.normal(0, 0.2, c),  # beta
            r.normal(0, 0.5, c),  # running mean
            r.uniform(0.3, 2.0, c),  # running var
        ]
        name = self.uid("bn")
        names = []
        for p, k in zip(params, ("scale", "B", "mean", "var"), strict=True):
            names.append(f"{name}_{k}")
            self.inits.append(numpy_helper.from_array(p.astype(np.float32), names[-1]))
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *names], [name], name=name, epsilon=eps)
        )
        return name

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        group: int = 1,
        bias: bool = False,
        pad: int | None = None,
    ) -> str:
        p = k // 2 if pad is None else pad
        w = self.weight([cout, cin // group, k, k], (cin // group) * k * k, "conv_W")
        ins = [x, w] + ([self.bias(cout, "conv_b")] if bias else [])
        return self.node(
            "Conv",
            ins,
            "conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            group=group,
        )

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="bnfuse-benchmarks",
        )
        m.ir_version = IR_VERSION
        m = onnx.shape_inference.infer_shapes(m)  # gives the outputs their shapes
        del m.graph.value_info[:]  # keep the file as an exporter without shapes writes it
        onnx.checker.check_model(m)
        return m


# ---------------------------------------------------------------------------------------
# Convolutional networks
# ---------------------------------------------------------------------------------------


def _resnet_basic(b: Builder, x: str, cin: int, cout: int, stride: int) -> str:
    y = b.relu(b.bn(b.conv(x, cin, cout, 3, stride), cout))
    y = b.bn(b.conv(y, cout, cout, 3), cout)
    short = x if (stride == 1 and cin == cout) else b.bn(b.conv(x, cin, cout, 1, stride), cout)
    return b.relu(b.node("Add", [y, short]))


def resnet34_56() -> onnx.ModelProto:
    """ResNet-34-style basic blocks [3, 4, 6] at 64/128/256 channels on 56x56 (29 BNs)."""
    b = Builder("resnet34_56", seed=1)
    x = b.input("image", ["N", 3, 56, 56])
    y = b.relu(b.bn(b.conv(x, 3, 64, 3), 64))
    c = 64
    for cout, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2)):
        for i in range(blocks):
            y = _resnet_basic(b, y, c, cout, stride if i == 0 else 1)
            c = cout
    y = b.node("GlobalAveragePool", [y])
    b.output(y)
    return b.model()


def resnet18_56() -> onnx.ModelProto:
    """ResNet-18-style basic blocks [2, 2] at 64/128 channels on 56x56 (10 BNs, small)."""
    b = Builder("resnet18_56", seed=2)
    x = b.input("image", ["N", 3, 56, 56])
    y = b.relu(b.bn(b.conv(x, 3, 64, 3), 64))
    c = 64
    for cout, blocks, stride in ((64, 2, 1), (128, 2, 2)):
        for i in range(blocks):
            y = _resnet_basic(b, y, c, cout, stride if i == 0 else 1)
            c = cout
    b.output(y)
    return b.model()


def resnet50_56() -> onnx.ModelProto:
    """ResNet-50-style bottlenecks [3, 4, 6, 3], widths 64..2048, on 56x56 (53 BNs, ~23M
    parameters: the size of a real ResNet-50 minus its classifier)."""
    b = Builder("resnet50_56", seed=3)
    x = b.input("image", ["N", 3, 56, 56])
    y = b.relu(b.bn(b.conv(x, 3, 64, 3), 64))
    c = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        cout = mid * 4
        for i in range(blocks):
            s = stride if i == 0 else 1
            z = b.relu(b.bn(b.conv(y, c, mid, 1), mid))
            z = b.relu(b.bn(b.conv(z, mid, mid, 3, s), mid))
            z = b.bn(b.conv(z, mid, cout, 1), cout)
            short = y if (s == 1 and c == cout) else b.bn(b.conv(y, c, cout, 1, s), cout)
            y = b.relu(b.node("Add", [z, short]))
            c = cout
    y = b.node("GlobalAveragePool", [y])
    b.output(y)
    return b.model()


def mobilenet_v1_112() -> onnx.ModelProto:
    """MobileNet-v1: depthwise (group=C) 3x3 Conv->BN->Relu, pointwise Conv->BN->Relu,
    widths 32..1024 on 112x112 (27 BNs)."""
    b = Builder("mobilenet_v1_112", seed=4)
    x = b.input("image", ["N", 3, 112, 112])
    y = b.relu(b.bn(b.conv(x, 3, 32, 3, 2), 32))
    c = 32
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
    plan += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for cout, stride in plan:
        y = b.relu(b.bn(b.conv(y, c, c, 3, stride, group=c), c))  # depthwise
        y = b.relu(b.bn(b.conv(y, c, cout, 1), cout))  # pointwise
        c = cout
    y = b.node("GlobalAveragePool", [y])
    b.output(y)
    return b.model()


def grouped_deconv() -> onnx.ModelProto:
    """Decoder of grouped ConvTranspose (group=4, k=4, stride 2)->BN->Relu, 256->32 channels
    from 7x7 to 224x224 (5 BNs). The layout several tools fold wrongly."""
    b = Builder("grouped_deconv", seed=5)
    x = b.input("latent", ["N", 256, 7, 7])
    y, c = x, 256
    for cout in (256, 128, 64, 64, 32):
        g = 4
        w = b.weight([c, cout // g, 4, 4], (c // g) * 16, "deconv_W")
        ins = [y, w, b.bias(cout, "deconv_b")]
        y = b.node(
            "ConvTranspose", ins, "deconv", kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1],
            group=g,
        )  # fmt: skip
        y = b.relu(b.bn(y, cout))
        c = cout
    b.output(y)
    return b.model()


# ---------------------------------------------------------------------------------------
# Fully connected networks
# ---------------------------------------------------------------------------------------


def gemm_bn_mlp(width: int = 1024, layers: int = 8) -> onnx.ModelProto:
    """Gemm(transB=1)->BN->Relu x8 at width 1024 (8 BNs, as exported from torch Linear)."""
    b = Builder("gemm_bn_mlp", seed=6)
    y = b.input("features", ["N", width])
    for _ in range(layers):
        w = b.weight([width, width], width, "fc_W")  # [out, in]
        y = b.node("Gemm", [y, w, b.bias(width, "fc_b")], "fc", transB=1)
        y = b.relu(b.bn(y, width))
    b.output(y)
    return b.model()


def matmul_add_bn_mlp(width: int = 1024, layers: int = 8) -> onnx.ModelProto:
    """MatMul->Add->BN->Relu x8 at width 1024 (8 BNs, as TF/Keras exporters emit Dense)."""
    b = Builder("matmul_add_bn_mlp", seed=7)
    y = b.input("features", ["N", width])
    for _ in range(layers):
        w = b.weight([width, width], width, "dense_W")  # [in, out]
        y = b.node("MatMul", [y, w], "dense")
        y = b.node("Add", [y, b.bias(width, "dense_b")], "dense_add")
        y = b.relu(b.bn(y, width))
    b.output(y)
    return b.model()


def bn_gemm_mlp(width: int = 1024, layers: int = 8) -> onnx.ModelProto:
    """BN->Gemm->Relu x8 at width 1024: every BN follows a Relu or the input, so it can only
    be folded forward into the Gemm after it (8 BNs)."""
    b = Builder("bn_gemm_mlp", seed=8)
    y = b.input("features", ["N", width])
    for _ in range(layers):
        y = b.bn(y, width)
        w = b.weight([width, width], width, "fc_W")
        y = b.relu(b.node("Gemm", [y, w, b.bias(width, "fc_b")], "fc", transB=1))
    b.output(y)
    return b.model()


def small_mixed() -> onnx.ModelProto:
    """A tiny CNN with every fold kind (Conv, depthwise, Gemm, forward BN->Gemm): 5 BNs.

    Measures the fixed per-call cost, where session/loader overhead dominates."""
    b = Builder("small_mixed", seed=9)
    x = b.input("image", ["N", 3, 32, 32])
    y = b.relu(b.bn(b.conv(x, 3, 16, 3), 16))
    y = b.relu(b.bn(b.conv(y, 16, 16, 3, 2, group=16), 16))
    y = b.relu(b.bn(b.conv(y, 16, 32, 1), 32))
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], "flatten", axis=1)
    y = b.node("Gemm", [y, b.weight([64, 32], 32, "fc_W"), b.bias(64, "fc_b")], "fc", transB=1)
    y = b.relu(b.bn(y, 64))
    y = b.bn(y, 64)
    y = b.node(
        "Gemm", [y, b.weight([10, 64], 64, "head_W"), b.bias(10, "head_b")], "head", transB=1
    )
    b.output(y)
    return b.model()


# ---------------------------------------------------------------------------------------
# As exporters write them: computed constants, layout ops around a BN (issue 18)
# ---------------------------------------------------------------------------------------


class DynamoBuilder(Builder):
    """Writes every bias-free Conv as ``torch.onnx.export(dynamo=True, optimize=False)``
    does: bias = Expand(CastLike(Constant 0, x), Expand(Shape(W, 0, 1), [1]))."""

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        group: int = 1,
        bias: bool = False,
        pad: int | None = None,
    ) -> str:
        y = super().conv(x, cin, cout, k, stride, group, bias, pad)
        conv = self.nodes[-1]
        if not bias:
            zero = self.node(
                "Constant", [], value=numpy_helper.from_array(np.asarray(0.0, dtype=np.float32))
            )
            zero = self.node("CastLike", [zero, x])
            dim0 = self.node("Shape", [conv.input[1]], start=0, end=1)
            one = self.node("Constant", [], value_ints=[1])
            b = self.node("Expand", [zero, self.node("Expand", [dim0, one])])
            self.nodes.remove(conv)
            conv.input.append(b)
            self.nodes.append(conv)
        return y


def dynamo_resnet18_56() -> onnx.ModelProto:
    """resnet18_56 as torch's dynamo exporter writes it without its optimizer: every
    Conv bias computed by Expand(CastLike(Constant 0), Shape(W)) (10 BNs)."""
    b = DynamoBuilder("dynamo_resnet18_56", seed=2)
    x = b.input("image", ["N", 3, 56, 56])
    y = b.relu(b.bn(b.conv(x, 3, 64, 3), 64))
    c = 64
    for cout, blocks, stride in ((64, 2, 1), (128, 2, 2)):
        for i in range(blocks):
            y = _resnet_basic(b, y, c, cout, stride if i == 0 else 1)
            c = cout
    b.output(y)
    m = b.model()
    m.opset_import[0].version = 18  # the dynamo exporter's opset
    return m


def _mul_add(b: Builder, x: str, c: int, shape: tuple[int, ...]) -> str:
    """A Keras BN as tf2onnx writes it: Mul(x, s) then Add(., t), constants of ``shape``."""
    s = b.r.uniform(0.5, 1.5, c) * b.r.choice([-1.0, 1.0], c, p=[0.1, 0.9])
    t = b.r.normal(0, 0.2, c)
    y = b.node("Mul", [x, b.const(s.reshape(shape).astype(np.float32), "bn_mul")], "bn_mul")
    return b.node("Add", [y, b.const(t.reshape(shape).astype(np.float32), "bn_add")], "bn_add")


def keras_conv1d_net(length: int = 256, width: int = 64, blocks: int = 4) -> onnx.ModelProto:
    """A Keras Conv1D stack as tf2onnx writes it (NWC input): Unsqueeze -> Transpose ->
    Conv -> Squeeze, each BN as Mul -> Add after the Squeeze (Conv1D -> BN), then ReLU and a
    second BN before the next block's Unsqueeze -> valid Conv (BN after the activation):
    2 BNs per block, none of which any peer folds."""
    b = Builder("keras_conv1d_net", seed=11)
    x = b.input("signal", ["N", length, 8])
    y = b.node("Unsqueeze", [x, b.const(np.array([1]), "axes")])
    y = b.node("Transpose", [y], perm=[0, 3, 1, 2])
    cin = 8
    for i in range(blocks):
        if i:
            y = b.node("Unsqueeze", [y, b.const(np.array([2]), "axes")])
        w = b.weight([width, cin, 1, 3], cin * 3, "conv_W")
        y = b.node("Conv", [y, w, b.bias(width, "conv_b")], "conv", kernel_shape=[1, 3])
        y = b.node("Squeeze", [y, b.const(np.array([2]), "axes")])
        y = _mul_add(b, y, width, (1, width, 1))
        y = _mul_add(b, b.relu(y), width, (1, width, 1))
        cin = width
    b.output(b.node("Transpose", [y], perm=[0, 2, 1]))
    return b.model()


def nhwc_convnet(width: int = 64, blocks: int = 4) -> onnx.ModelProto:
    """An NHWC-born CNN converted to ONNX with its transposes kept: Conv -> Transpose to
    NHWC -> Mul -> Add per channel on the last axis -> ReLU -> Transpose back (4 BNs)."""
    b = Builder("nhwc_convnet", seed=12)
    y = b.input("image", ["N", 3, 56, 56])
    cin = 3
    for _ in range(blocks):
        y = b.node("Transpose", [b.conv(y, cin, width, 3)], perm=[0, 2, 3, 1])
        y = b.relu(_mul_add(b, y, width, (width,)))
        y = b.node("Transpose", [y], perm=[0, 3, 1, 2])
        cin = width
    b.output(y)
    return b.model()


#: The exporter-style models (``benchmarks/exporters.py`` compares them with onnxscript).
EXPORTER_MODELS: tuple[str, ...] = ("dynamo_resnet18_56", "keras_conv1d_net", "nhwc_convnet")

#: Every benchmark model, by name (builders take no arguments).
MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "dynamo_resnet18_56": dynamo_resnet18_56,
    "keras_conv1d_net": keras_conv1d_net,
    "nhwc_convnet": nhwc_convnet,
    "resnet18_56": resnet18_56,
    "resnet34_56": resnet34_56,
    "resnet50_56": resnet50_56,
    "mobilenet_v1_112": mobilenet_v1_112,
    "grouped_deconv": grouped_deconv,
    "gemm_bn_mlp": gemm_bn_mlp,
    "matmul_add_bn_mlp": matmul_add_bn_mlp,
    "bn_gemm_mlp": bn_gemm_mlp,
    "small_mixed": small_mixed,
}

#: A subset that covers every fold kind and builds/runs in seconds.
QUICK: tuple[str, ...] = ("small_mixed", "resnet18_56", "grouped_deconv", "gemm_bn_mlp")


def build(name: str) -> onnx.ModelProto:
    """Build the model registered as ``name``."""
    try:
        return MODELS[name]()
    except KeyError:
        raise KeyError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}") from None


def describe(model: onnx.ModelProto) -> dict[str, int]:
    """Node, BatchNormalization and parameter counts of a model (main graph)."""
    return {
        "nodes": len(model.graph.node),
        "bn": sum(n.op_type == "BatchNormalization" for n in model.graph.node),
        "params": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
    }
