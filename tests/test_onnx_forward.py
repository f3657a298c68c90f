"""Forward folds (BN -> linear layer) on ONNX graphs (issue: BN after the activation,
BN as the first layer)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_util import GraphBuilder, assert_close, count_ops

from bnfuse.backend import FuseOptions
from bnfuse.onnx.backend import OnnxBackend
from bnfuse.onnx.rules import PAD_REASON
from bnfuse.reasons import TRANSPOSE_SHIFT


def fuse(model: onnx.ModelProto, **opts: object):
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    onnx.checker.check_model(res.model, full_check=True)
    return res


def folded(model: onnx.ModelProto, n: int, direction: str = "forward"):
    res = fuse(model)
    assert len(res.folds) == n, res.refusals
    assert all(f.direction == direction for f in res.folds)
    assert count_ops(res.model, "BatchNormalization") == 0
    assert_close(model, res.model)
    return res


@pytest.mark.parametrize("op", ["Gemm", "GemmT", "MatMul", "MatMulAdd"])
def test_bn_then_dense(op: str) -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", 5])
    y = b.bn(x, 5, name="bn")  # first layer: standardizes the inputs
    if op == "Gemm":
        y = b.node(
            "Gemm", [y, b.weight([5, 3]), b.const(np.ones(3, np.float32))], alpha=0.5, beta=2.0
        )
    elif op == "GemmT":
        y = b.node("Gemm", [y, b.weight([3, 5])], transB=1)
    else:
        y = b.node("MatMul", [y, b.weight([5, 3])])
        if op == "MatMulAdd":
            y = b.node("Add", [y, b.const(np.ones(3, np.float32))])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].bn == "bn"


@pytest.mark.parametrize("via", ["Flatten", "Reshape"])
@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_bn_flatten_dense(via: str, op: str) -> None:
    b = GraphBuilder(seed=2)
    x = b.input("x", ["N", 3, 4, 5])
    y = b.bn(x, 3)
    if via == "Flatten":
        y = b.node("Flatten", [y], axis=1)
    else:
        y = b.node("Reshape", [y, b.const(np.array([0, -1], np.int64))])
    y = b.node(op, [y, b.weight([60, 7])])
    b.output(y)
    folded(b.model(), 1)


@pytest.mark.parametrize("group", [1, 2])
def test_bn_then_conv_valid(group: int) -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 4, 7, 7])
    y = b.node("Relu", [x])
    y = b.bn(y, 4)
    y = b.conv(y, 4, 6, [3, 3], group=group, strides=[2, 2])
    b.output(y)
    folded(b.model(), 1)


def test_bn_then_padded_conv_refused() -> None:
    b = GraphBuilder(seed=4)
    x = b.input("x", ["N", 4, 7, 7])
    y = b.bn(b.node("Relu", [x]), 4, name="bn")
    y = b.conv(y, 4, 6, [3, 3], pads=[1, 1, 1, 1])
    b.output(y)
    res = fuse(b.model())
    assert not res.folds
    assert res.refusals[0].reason == PAD_REASON


def zero_shift_bn(b: GraphBuilder, x: str, c: int) -> str:
    """A BN named "bn" whose shift is exactly 0 (beta = mean = 0): it folds as a scale."""
    gamma, var = b.r.uniform(0.5, 2, c), b.r.uniform(0.5, 2, c)
    mean = beta = np.zeros(c)  # t = beta - s*mean = 0
    p = [b.const(v.astype(np.float32)) for v in (gamma, beta, mean, var)]
    return b.node("BatchNormalization", [x, *p], name="bn")


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_scale_only_bn_then_padded_conv_folds(op: str) -> None:
    """A zero-shift BN folds into a zero-padded Conv, or a padded, strided ConvTranspose:
    a pure scale commutes with the padding."""
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 4, 7, 7])
    y = zero_shift_bn(b, b.node("Relu", [x]), 4)
    if op == "Conv":
        y = b.conv(y, 4, 6, [3, 3], pads=[1, 1, 1, 1])
    else:
        y = b.node("ConvTranspose", [y, b.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1], strides=[2, 2])
    b.output(y)
    res = folded(b.model(), 1)
    assert "scale only" in res.folds[0].detail


def test_chain_backward_then_forward() -> None:
    # Conv -> BN -> ReLU -> BN -> Conv: the first folds backward, the second forward.
    b = GraphBuilder(seed=6)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.conv(x, 3, 4, [3, 3])
    y = b.bn(y, 4, name="bn1")
    y = b.node("Relu", [y])
    y = b.bn(y, 4, name="bn2")
    y = b.conv(y, 4, 5, [3, 3])
    b.output(y)
    res = fuse(b.model())
    dirs = {f.bn: f.direction for f in res.folds}
    assert dirs == {"bn1": "backward", "bn2": "forward"}
    assert_close(b.model(), res.model)


def test_mlp_three_bns() -> None:
    # Input -> BN -> Flatten -> Dense -> ReLU -> BN -> Dense -> ReLU -> BN -> Dense
    b = GraphBuilder(seed=7)
    x = b.input("x", ["N", 2, 3, 3])
    y = b.bn(x, 2, name="bn_in")
    y = b.node("Flatten", [y])
    y = b.node("Gemm", [y, b.weight([18, 8]), b.const(np.zeros(8, np.float32))])
    y = b.node("Relu", [y])
    y = b.bn(y, 8, name="bn_mid")
    y = b.node("Gemm", [y, b.weight([8, 6]), b.const(np.zeros(6, np.float32))])
    y = b.node("Relu", [y])
    y = b.bn(y, 6, name="bn_last")
    y = b.node("Gemm", [y, b.weight([6, 3])])
    b.output(y)
    res = folded(b.model(), 3)
    assert {f.bn for f in res.folds} == {"bn_in", "bn_mid", "bn_last"}


def test_several_consumers_all_linear_fold() -> None:
    b = GraphBuilder(seed=8)
    x = b.input("x", ["N", 5])
    y = b.bn(b.node("Relu", [x]), 5)
    b.output(b.node("Gemm", [y, b.weight([5, 3])]))
    b.output(b.node("MatMul", [y, b.weight([5, 2])]))
    res = folded(b.model(), 1)
    assert "," in res.folds[0].into


def test_several_consumers_one_not_linear_refused() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", ["N", 5])
    y = b.bn(b.node("Relu", [x]), 5, name="bn")
    b.output(b.node("Gemm", [y, b.weight([5, 3])]))
    b.output(b.node("Relu", [y]))
    res = fuse(b.model())
    assert not res.folds
    assert "cannot absorb it" in res.refusals[0].reason


def test_bn_before_conv_transpose_needs_zero_shift() -> None:
    b = GraphBuilder(seed=10)
    x = b.input("x", ["N", 4, 5, 5])
    y = b.bn(b.node("Relu", [x]), 4, name="bn")
    y = b.node("ConvTranspose", [y, b.weight([4, 3, 3, 3])])
    b.output(y)
    res = fuse(b.model())
    assert not res.folds
    assert res.refusals[0].reason == TRANSPOSE_SHIFT  # one wording with Keras
    assert res.refusals[0].code == "padding"


def test_no_forward_option() -> None:
    b = GraphBuilder(seed=11)
    x = b.input("x", ["N", 5])
    y = b.bn(x, 5)
    b.output(b.node("Gemm", [y, b.weight([5, 3])]))
    assert not fuse(b.model(), forward=False).folds


def test_bn_rank3_before_matmul_refused() -> None:
    b = GraphBuilder(seed=12)
    x = b.input("x", [2, 5, 4])
    y = b.bn(x, 5, name="bn")
    b.output(b.node("MatMul", [y, b.weight([4, 3])]))
    res = fuse(b.model())
    assert not res.folds
    assert "rank-3" in res.refusals[0].reason


@pytest.mark.parametrize(
    ("const_shape", "via"),
    [
        ((1, 4, 5), "Flatten"),  # element-wise input standardization (one value per pixel)
        ((1, 4, 1), "Flatten"),  # per-row (axis 1)
        ((5,), "Reshape"),  # per-column (last axis), as Keras's exporter emits it
        ((), "Flatten"),  # scalar
    ],
)
@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_first_layer_affine_flatten_dense(const_shape: tuple[int, ...], via: str, op: str) -> None:
    # Input (N, 4, 5) -> Mul(c) -> Add(c) -> Flatten/Reshape -> Dense: a StandardScaler in the graph.
    b = GraphBuilder(seed=13)
    x = b.input("x", ["N", 4, 5])
    y = b.node("Mul", [x, b.const(b.r.uniform(0.5, 2, const_shape).astype(np.float32))])
    y = b.node("Add", [y, b.const(b.r.normal(0, 1, const_shape).astype(np.float32))])
    if via == "Flatten":
        y = b.node("Flatten", [y])
    else:
        y = b.node("Reshape", [y, b.const(np.array([-1, 20], np.int64))])
    y = b.node(op, [y, b.weight([20, 3])])
    b.output(y)
    m = b.model()
    res = fuse(m)
    assert len(res.folds) == 1, res.refusals
    assert res.folds[0].direction == "forward" and res.folds[0].kind == "Mul+Add"
    assert count_ops(res.model, "Mul") == 0 and count_ops(res.model, "Add") <= (
        1 if op == "MatMul" else 0
    )
    assert_close(m, res.model)


def test_elementwise_affine_before_conv_refused() -> None:
    b = GraphBuilder(seed=14)
    x = b.input("x", ["N", 2, 5, 5])
    y = b.node("Mul", [x, b.const(b.r.uniform(0.5, 2, (1, 2, 5, 5)).astype(np.float32))])
    y = b.conv(y, 2, 3, [3, 3])
    b.output(y)
    res = fuse(b.model())
    assert not res.folds
    assert "varies along several axes" in res.refusals[0].reason


def test_overflow_in_a_later_consumer_leaves_the_earlier_ones_unwritten() -> None:
    # BN -> two 1x1 Convs (float16); the second's folded bias overflows: both are checked
    # before either is rewritten, so the refusal leaves the graph exactly as it was
    from onnx import TensorProto

    b = GraphBuilder(seed=14, dtype=TensorProto.FLOAT16)
    x = b.input("x", ["N", 2, 4, 4])
    params = [np.full(2, 1, np.float16), np.full(2, 100, np.float16)]
    params += [np.zeros(2, np.float16), np.full(2, 1, np.float16)]
    y = b.node("BatchNormalization", [x] + [b.const(p) for p in params], name="bn")
    w1 = b.const(np.full((2, 2, 1, 1), 0.5, np.float16))
    w2 = b.const(np.full((2, 2, 1, 1), 320, np.float16))
    big = b.const(np.full(2, 5000, np.float16))
    b.output(b.node("Conv", [y, w1]))
    b.output(b.node("Conv", [y, w2, big]))  # bias 5000 + 2*320*100 = 69000 > 65504
    m = b.model()
    res = fuse(m)
    assert not res.folds, res.folds
    assert "overflow float16" in res.refusals[0].reason, res.refusals
    assert res.model.graph.node == m.graph.node
    assert list(res.model.graph.initializer) == list(m.graph.initializer)


def test_both_possible_prefers_backward() -> None:
    # Conv -> BN -> valid Conv: either direction folds exactly; backward is preferred
    b = GraphBuilder(seed=15)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.conv(x, 3, 4, [3, 3], name="conv1")
    y = b.bn(y, 4, name="bn")
    y = b.conv(y, 4, 5, [3, 3], name="conv2")
    b.output(y)
    res = folded(b.model(), 1, direction="backward")
    assert [(f.bn, f.direction, f.into, f.rule) for f in res.folds] == [
        ("bn", "backward", "conv1", "conv-bn")
    ]


def test_bn_then_auto_pad_conv_refused() -> None:
    b = GraphBuilder(seed=17)
    x = b.input("x", ["N", 4, 7, 7])
    y = b.bn(b.node("Relu", [x]), 4, name="bn")
    y = b.conv(y, 4, 6, [3, 3], auto_pad="SAME_UPPER")
    b.output(y)
    res = fuse(b.model())
    assert not res.folds
    assert [(r.bn, r.reason) for r in res.refusals] == [("bn", PAD_REASON)]


def test_two_consumers_one_padded_refused_graph_unchanged() -> None:
    b = GraphBuilder(seed=18)
    x = b.input("x", ["N", 4, 7, 7])
    y = b.bn(b.node("Relu", [x]), 4, name="bn")
    b.output(b.conv(y, 4, 6, [3, 3]))
    b.output(b.conv(y, 4, 5, [3, 3], pads=[1, 1, 1, 1]))
    m = b.model()
    res = fuse(m)
    assert not res.folds
    assert [(r.bn, r.reason) for r in res.refusals] == [("bn", PAD_REASON)]
    assert count_ops(res.model, "BatchNormalization") == 1
    assert res.model.graph.node == m.graph.node
    assert list(res.model.graph.initializer) == list(m.graph.initializer)


def test_rank3_per_channel_mul_add_then_matmul_folds() -> None:
    # (N, T, C) -> Mul([C]) -> Add([C]) -> MatMul([C, K]): a BN in disguise on the last axis
    b = GraphBuilder(seed=19)
    x = b.input("x", ["N", 4, 5])
    y = b.node("Mul", [x, b.const(b.r.uniform(0.5, 2, 5).astype(np.float32))])
    y = b.node("Add", [y, b.const(b.r.normal(0, 1, 5).astype(np.float32))])
    y = b.node("MatMul", [y, b.weight([5, 3])], name="mm")
    b.output(y)
    m = b.model()
    res = fuse(m)
    assert [(f.direction, f.kind, f.rule, f.into) for f in res.folds] == [
        ("forward", "Mul+Add", "bn-gemm", "mm")
    ], res.refusals
    assert count_ops(res.model, "Mul") == 0
    assert_close(m, res.model)


def _inference_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every shape inference the pass runs (it is deferred until a rule needs it)."""
    import bnfuse.onnx.shapes as shapes_mod

    calls: list[str] = []
    real = shapes_mod.shape_tree

    def spy(model: onnx.ModelProto) -> object:
        calls.append(model.graph.name)
        return real(model)

    monkeypatch.setattr(shapes_mod, "shape_tree", spy)
    return calls


def test_ranks_proven_from_the_graph_need_no_shape_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Input -> BN -> Conv -> BN -> Relu -> BN -> Conv: the first BN's rank is the input's
    declared one, the others follow from the Conv weights; inference never runs."""
    calls = _inference_calls(monkeypatch)
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.bn(b.conv(b.bn(x, 3, name="first"), 3, 4, [3, 3]), 4, name="before")
    y = b.bn(b.node("Relu", [y]), 4, name="after")
    b.output(b.conv(y, 4, 2, [1, 1]))
    model = b.model()
    res = fuse(model)
    assert sorted(f.bn for f in res.folds) == ["after", "before", "first"], res.refusals
    assert count_ops(res.model, "BatchNormalization") == 0
    assert_close(model, res.model)
    assert calls == []


def test_shape_inference_runs_once_when_a_rule_needs_a_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BN -> Flatten -> Gemm needs the BN input's shape (channels times spatial size):
    inference runs, once, and the fold is made."""
    calls = _inference_calls(monkeypatch)
    b = GraphBuilder(seed=6)
    x = b.input("x", ["N", 3, 4, 5])
    y = b.node("Flatten", [b.bn(b.node("Relu", [x]), 3)], axis=1)
    b.output(b.node("Gemm", [y, b.weight([60, 2])]))
    model = b.model()
    folded(model, 1)
    assert len(calls) == 1


def test_rank_is_proven_only_for_the_first_output_of_a_rank_keeping_op() -> None:
    """A training-mode BatchNormalization's running mean is a vector, not its input's
    rank; nothing is proven for it (shape inference, if it runs, says)."""
    from bnfuse.onnx.graph import Graph, NameSource

    b = GraphBuilder(seed=7)
    x = b.input("x", ["N", 3, 4, 4])
    params = [b.const(np.ones(3, np.float32)) for _ in range(4)]
    bn = onnx.helper.make_node(
        "BatchNormalization", [x, *params], ["y", "rm", "rv"], training_mode=1, name="bn"
    )
    b.nodes.append(bn)
    b.output("y")
    model = b.model()
    g = Graph(model.graph, NameSource(model))
    assert g.rank("y") == 4
    assert g.rank("rm") is None and g.rank("") is None


def test_lazy_inference_after_earlier_folds_gives_the_eager_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Conv -> BN folds first; the residual BN -> Flatten -> Gemm then needs a shape, so
    inference runs on the partly fused model: the output is the one inference on the
    untouched model gives."""
    import bnfuse.onnx.fuse as fuse_mod
    import bnfuse.onnx.shapes as shapes_mod

    calls = _inference_calls(monkeypatch)
    b = GraphBuilder(seed=8)
    x = b.input("x", ["N", 3, 4, 4])
    y = b.bn(b.conv(x, 3, 3, [1, 1]), 3, name="first")
    y = b.node("Add", [b.node("Relu", [y]), x])
    y = b.node("Flatten", [b.bn(y, 3, name="second")], axis=1)
    b.output(b.node("Gemm", [y, b.weight([48, 2])]))
    model = b.model()
    lazy = fuse(model)
    assert sorted(f.bn for f in lazy.folds) == ["first", "second"], lazy.refusals
    assert len(calls) == 1
    assert_close(model, lazy.model)
    monkeypatch.setattr(fuse_mod, "lazy_shape_tree", shapes_mod.shape_tree)
    eager = fuse(model)
    assert lazy.model.SerializeToString() == eager.model.SerializeToString()


def test_inference_for_subgraphs_runs_before_any_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subgraph shapes are keyed by node index: with an If node, inference runs when the
    subgraphs are visited, before the first fold changes the node list."""
    import bnfuse.onnx.rules as rules

    order: list[str] = []
    calls = _inference_calls(monkeypatch)
    real = rules.ConvBN.rewrite

    def rewrite(self, m, g):  # type: ignore[no-untyped-def]
        order.append(f"fold after {len(calls)} inference(s)")
        return real(self, m, g)

    monkeypatch.setattr(rules.ConvBN, "rewrite", rewrite)
    b = GraphBuilder(seed=9)
    x = b.input("x", ["N", 3, 4, 4])
    y = b.bn(b.conv(x, 3, 3, [1, 1]), 3, name="outer")
    sub = GraphBuilder(seed=10)
    sub._n = 100  # names of its own, apart from the outer graph's
    z = sub.bn(sub.conv(y, 3, 3, [1, 1]), 3, name="inner")
    out = onnx.helper.make_tensor_value_info(z, onnx.TensorProto.FLOAT, None)
    branch = onnx.helper.make_graph(sub.nodes, "branch", [], [out], sub.inits)
    cond = b.const(np.array(True))
    b.nodes.append(
        onnx.helper.make_node(
            "If", [cond], ["out"], then_branch=branch, else_branch=branch, name="if"
        )
    )
    b.output("out")
    res = fuse(b.model())
    assert len(res.folds) == 3 and order and all(o == "fold after 1 inference(s)" for o in order)
