"""BN in disguise: Mul/Add/Sub/Div by per-channel constants next to linear layers, folded
like a BatchNormalization. Compared in onnxruntime with graph optimizations disabled."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_util import GraphBuilder, assert_close, count_ops

from bnfuse.backend import FuseOptions
from bnfuse.onnx.backend import OnnxBackend
from bnfuse.onnx.count import count_affine_nodes

AFFINE = ("Mul", "Add", "Sub", "Div")


def fuse(model: onnx.ModelProto, **opts: object):
    before = model.SerializeToString()
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    assert model.SerializeToString() == before, "input model was mutated"
    onnx.checker.check_model(res.model, full_check=True)
    return res


def folded(model: onnx.ModelProto, n: int, rtol: float = 1e-4, atol: float = 1e-5, **opts: object):
    res = fuse(model, **opts)
    assert len(res.folds) == n, res.refusals
    assert not res.refusals, res.refusals
    assert count_ops(res.model, "BatchNormalization") == 0
    assert_close(model, res.model, rtol=rtol, atol=atol)
    return res


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def vec(b: GraphBuilder, shape: tuple[int, ...], lo: float = 0.5, hi: float = 2.0) -> str:
    """A constant with values away from 0 and 1, signs mixed."""
    r = b.r
    v = r.uniform(lo, hi, shape) * r.choice([-1.0, 1.0], shape)
    return b.const(v.astype(b.np_dtype), "k")


def conv4(b: GraphBuilder, cin: int = 3, cout: int = 4, group: int = 1, hw: int = 6) -> str:
    x = b.input("x", ["N", cin, hw, hw])
    return b.conv(x, cin, cout, [3, 3], group=group)


# ---- every operand order ----------------------------------------------------------


ORDERS = [
    ("Mul", "xc"),
    ("Mul", "cx"),
    ("Add", "xc"),
    ("Add", "cx"),
    ("Sub", "xc"),
    ("Sub", "cx"),
    ("Div", "xc"),
]


@pytest.mark.parametrize(("op", "order"), ORDERS)
@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1)])
def test_operand_orders_after_conv(op: str, order: str, shape: tuple[int, ...]) -> None:
    b = GraphBuilder(seed=len(op) * 7 + len(shape) + (order == "cx"))
    y = conv4(b)
    c = vec(b, shape)
    y = b.node(op, [c, y] if order == "cx" else [y, c], name="aff")
    b.output(b.node("Relu", [y]))
    m = b.model()
    res = folded(m, 1)
    assert res.folds[0].kind == op
    assert res.folds[0].rule == "conv-bn"
    assert res.folds[0].bn == "aff"
    assert ops(res.model) == ["Conv", "Relu"]


REVERSED = ["Mul", "Add", "Sub"]  # op(c, x); Div(c, x) is not affine in x


@pytest.mark.parametrize(
    ("op", "bias"),
    # without a bias, Add(c, x) right after the MatMul IS its bias (see the next test)
    [("Mul", False), ("Sub", False), ("Mul", True), ("Add", True), ("Sub", True)],
)
def test_reversed_operands_after_matmul(op: str, bias: bool) -> None:
    b = GraphBuilder(seed=40 + len(op) + bias)
    x = b.input("x", ["N", 5])
    y = b.node("MatMul", [x, b.weight([5, 6])])
    if bias:  # a Dense layer's bias Add
        y = b.node("Add", [y, vec(b, (6,))])
    y = b.node(op, [vec(b, (6,)), y], name="aff")
    b.output(b.node("Relu", [y]))
    res = folded(b.model(), 1)
    assert (res.folds[0].bn, res.folds[0].kind) == ("aff", op)
    assert res.folds[0].rule == "matmul-bn"
    # Sub(c, x) = -x + c needs a bias: the one there, or a new Add
    expected = ["MatMul", "Relu"] if (op, bias) == ("Mul", False) else ["MatMul", "Add", "Relu"]
    assert ops(res.model) == expected


def test_reversed_add_right_after_matmul_is_its_bias() -> None:
    b = GraphBuilder(seed=44)
    x = b.input("x", ["N", 5])
    y = b.node("Add", [vec(b, (6,)), b.node("MatMul", [x, b.weight([5, 6])])])
    b.output(b.node("Relu", [y]))
    res = fuse(b.model())
    assert not res.folds
    assert not res.refusals


@pytest.mark.parametrize("op", REVERSED)
@pytest.mark.parametrize("c_shape", [(5,), (1, 5)])
def test_reversed_operands_after_gemm(op: str, c_shape: tuple[int, ...]) -> None:
    b = GraphBuilder(seed=45 + len(op) + len(c_shape))
    x = b.input("x", ["N", 3])
    y = b.node("Gemm", [x, b.weight([5, 3]), vec(b, (5,))], transB=1, alpha=0.7)
    y = b.node(op, [vec(b, c_shape), y], name="aff")
    b.output(b.node("Relu", [y]))
    res = folded(b.model(), 1)
    assert (res.folds[0].bn, res.folds[0].kind) == ("aff", op)
    assert res.folds[0].rule == "gemm-bn"
    assert ops(res.model) == ["Gemm", "Relu"]


@pytest.mark.parametrize("op", REVERSED)
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (8, 1, 1)])
def test_reversed_operands_after_grouped_conv_transpose(op: str, shape: tuple[int, ...]) -> None:
    b = GraphBuilder(seed=50 + len(op) + len(shape))
    group, cin, cout = 2, 4, 8
    x = b.input("x", ["N", cin, 5, 5])
    w = b.weight([cin, cout // group, 3, 3])
    y = b.node("ConvTranspose", [x, w], group=group, strides=[2, 2])
    y = b.node(op, [vec(b, shape), y], name="aff")
    b.output(b.node("Relu", [y]))
    res = folded(b.model(), 1)
    assert (res.folds[0].bn, res.folds[0].kind) == ("aff", op)
    assert res.folds[0].rule == "conv-transpose-bn"
    assert ops(res.model) == ["ConvTranspose", "Relu"]


def test_div_by_constant_is_not_div_of_constant() -> None:
    # Div(c, x) = c / x is not affine in x: left alone, and not reported either
    b = GraphBuilder(seed=1)
    y = conv4(b)
    b.output(b.node("Div", [vec(b, (1, 4, 1, 1)), y]))
    res = fuse(b.model())
    assert not res.folds
    assert not res.refusals


def test_div_by_zero_refused() -> None:
    b = GraphBuilder(seed=2)
    y = conv4(b)
    b.output(b.node("Div", [y, b.const(np.array([1, 2, 0, 4], np.float32).reshape(4, 1, 1))]))
    res = fuse(b.model())
    assert not res.folds
    assert "contains 0" in res.refusals[0].reason


# ---- every linear layer -----------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, "depthwise"])
def test_mul_add_after_grouped_conv(group: int | str) -> None:
    b = GraphBuilder(seed=3)
    cin = 4
    g = cin if group == "depthwise" else int(group)
    cout = 4 if group == "depthwise" else 6
    x = b.input("x", ["N", cin, 7, 7])
    y = b.conv(x, cin, cout, [3, 3], group=g, bias=False, pads=[1, 1, 1, 1])
    y = b.node("Mul", [y, vec(b, (1, cout, 1, 1))])
    y = b.node("Add", [y, vec(b, (1, cout, 1, 1))])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].kind == "Mul+Add"
    assert ops(res.model) == ["Conv"]


@pytest.mark.parametrize("group", [1, 2, 4])
def test_mul_add_after_grouped_conv_transpose(group: int) -> None:
    b = GraphBuilder(seed=4 + group)
    cin, cout = 4, 8 if group != 4 else 4
    x = b.input("x", ["N", cin, 5, 5])
    w = b.weight([cin, cout // group, 3, 3])
    y = b.node("ConvTranspose", [x, w], group=group, strides=[2, 2])
    y = b.node("Mul", [vec(b, (cout, 1, 1)), y])
    y = b.node("Sub", [y, vec(b, (1, cout, 1, 1))])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].rule == "conv-transpose-bn"
    assert ops(res.model) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5)])
def test_mul_add_after_gemm(trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    b = GraphBuilder(seed=5 + trans_b)
    x = b.input("x", ["N", 3])
    ins = [x, b.weight([5, 3] if trans_b else [3, 5])]
    if c_shape is not None:
        ins.append(vec(b, c_shape))
    y = b.node("Gemm", ins, transB=trans_b, alpha=0.7, beta=1.3)
    y = b.node("Mul", [y, vec(b, (5,))])
    y = b.node("Add", [vec(b, (1, 5)), y])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].rule == "gemm-bn"
    assert ops(res.model) == ["Gemm"]


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_mul_add_after_matmul_any_rank(rank: int, bias: bool) -> None:
    # x @ W indexes the LAST axis; a last-axis affine folds for an input of any rank
    b = GraphBuilder(seed=6 + rank)
    x = b.input("x", [*["N", 3, 2, 5][: rank - 1], 5])
    y = b.node("MatMul", [x, b.weight([5, 6])])
    if bias:
        y = b.node("Add", [y, vec(b, (6,))])
    y = b.node("Mul", [y, vec(b, (6,))])
    y = b.node("Add", [y, vec(b, (1,) * (rank - 1) + (6,))])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].rule == "matmul-bn"
    assert ops(res.model) == ["MatMul", "Add"]  # the bias Add (created when absent)


@pytest.mark.parametrize("bias", ["none", "before", "after"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_matmul_through_last_axis_keeping_reshape(bias: str, dynamic: bool) -> None:
    # Keras exports Dense on [N, T, K] as Reshape -> MatMul -> Reshape (-> bias Add)
    b = GraphBuilder(seed=31)
    x = b.input("x", [2, 3, 5])
    flat = b.node("Reshape", [x, b.const(np.array([-1, 5], np.int64))])
    y = b.node("MatMul", [flat, b.weight([5, 6])])
    if bias == "before":
        y = b.node("Add", [y, vec(b, (6,))])
    if dynamic:  # target shape computed from the input's shape, as tf2onnx emits it
        lead = b.node(
            "Slice", [b.node("Shape", [x]), b.const(np.array([0])), b.const(np.array([2]))]
        )
        target = b.node("Concat", [lead, b.const(np.array([6]))], axis=0)
    else:
        target = b.const(np.array([2, 3, 6], np.int64))
    y = b.node("Reshape", [y, target])
    if bias == "after":
        y = b.node("Add", [vec(b, (1, 1, 6)), y])
    y = b.node("Mul", [y, vec(b, (6,))], name="mul")
    y = b.node("Add", [y, vec(b, (6,))])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].rule == "matmul-bn"
    assert count_ops(res.model, "Mul") == 0
    assert count_ops(res.model, "Add") == 1


def test_matmul_affine_on_non_last_axis_refused() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", [2, 3, 5])
    y = b.node("MatMul", [x, b.weight([5, 6])])
    y = b.node("Mul", [y, vec(b, (3, 1))], name="aff")
    b.output(y)
    res = fuse(b.model(), forward=False)
    assert not res.folds
    reason = res.refusals[0].reason
    assert "axis 1 of a rank-3 MatMul output" in reason
    assert "last axis" in reason


def test_matmul_bias_add_alone_is_not_a_normalization() -> None:
    b = GraphBuilder(seed=8)
    x = b.input("x", ["N", 5])
    y = b.node("Add", [b.node("MatMul", [x, b.weight([5, 6])]), vec(b, (6,))])
    b.output(b.node("Relu", [y]))
    res = fuse(b.model())
    assert not res.folds
    assert not res.refusals


def test_sub_after_matmul_becomes_the_bias() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", ["N", 5])
    y = b.node("Sub", [b.node("MatMul", [x, b.weight([5, 6])]), vec(b, (6,))])
    b.output(y)
    res = folded(b.model(), 1)
    assert ops(res.model) == ["MatMul", "Add"]


# ---- chains -------------------------------------------------------------------------


def test_chain_mul_add_bn() -> None:
    b = GraphBuilder(seed=10)
    y = conv4(b)
    y = b.node("Mul", [y, vec(b, (1, 4, 1, 1))])
    y = b.node("Add", [y, vec(b, (4, 1, 1))])
    y = b.bn(y, 4)
    b.output(b.node("Relu", [y]))
    res = folded(b.model(), 2)
    assert sorted(f.kind for f in res.folds) == ["BatchNormalization", "Mul+Add"]
    assert ops(res.model) == ["Conv", "Relu"]


def test_chain_bn_then_affines_in_any_order() -> None:
    b = GraphBuilder(seed=11)
    y = conv4(b)
    y = b.bn(y, 4)
    y = b.node("Add", [y, vec(b, (1, 4, 1, 1))])
    y = b.node("Div", [y, vec(b, ())])  # scalar
    y = b.node("Sub", [vec(b, (4, 1, 1)), y])
    y = b.node("Mul", [y, vec(b, (1, 4, 1, 1))])
    b.output(y)
    res = folded(b.model(), 2)
    assert {f.kind for f in res.folds} == {"BatchNormalization", "Add+Div+Sub+Mul"}
    assert ops(res.model) == ["Conv"]


def test_chain_broken_by_a_different_axis() -> None:
    # Mul [C,1,1] is per channel; the following Add of a [W]-shaped constant (W == C here)
    # varies along the last axis, so it stays (and is reported)
    b = GraphBuilder(seed=12)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.conv(x, 3, 4, [3, 3])  # -> [N, 4, 4, 4]
    y = b.node("Mul", [y, vec(b, (4, 1, 1))], name="mul")
    y = b.node("Add", [y, vec(b, (4,))], name="add")
    b.output(y)
    m = b.model()
    res = fuse(m)
    assert [f.bn for f in res.folds] == ["mul"]
    assert [r.bn for r in res.refusals] == ["add"]
    assert "axis 3 (the last axis) of a rank-4 Conv output" in res.refusals[0].reason
    assert_close(m, res.model)


# ---- what must not fold -------------------------------------------------------------


def only_mul_refused(m: onnx.ModelProto) -> str:
    """Fuse ``m``, whose one normalization candidate is the Mul node "mul": nothing
    folds, that Mul is refused and stays, outputs unchanged. Returns the reason."""
    res = fuse(m)
    assert not res.folds
    assert len(res.refusals) == 1
    r = res.refusals[0]
    assert (r.bn, r.kind) == ("mul", "Mul")
    assert count_ops(res.model, "Mul") == 1
    assert_close(m, res.model)
    return r.reason


def test_c_shaped_constant_on_4d_conv_output_refused() -> None:
    # [C] broadcasts over W (the last axis), not over channels, even when W == C
    b = GraphBuilder(seed=13)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.conv(x, 3, 4, [3, 3])
    y = b.node("Mul", [y, vec(b, (4,))], name="mul")
    b.output(y)
    assert "not its channel axis 1" in only_mul_refused(b.model())


@pytest.mark.parametrize("order", ["xc", "cx"])
def test_c_shaped_constant_on_4d_conv_transpose_output_refused(order: str) -> None:
    # ConvTranspose [N, 4, 3, 3] -> [N, 6, 6, 6] (group 2): a [6] constant broadcasts over
    # W, the last axis, although W == C
    b = GraphBuilder(seed=33)
    x = b.input("x", ["N", 4, 3, 3])
    y = b.node("ConvTranspose", [x, b.weight([4, 3, 4, 4])], group=2)
    c = vec(b, (6,))
    y = b.node("Mul", [c, y] if order == "cx" else [y, c], name="mul")
    b.output(y)
    assert only_mul_refused(b.model()) == (
        "Mul acts on axis 3 (the last axis) of a rank-4 ConvTranspose output, "
        "not its channel axis 1"
    )


def test_full_shaped_constant_next_to_conv_refused_elsewhere_ignored() -> None:
    b = GraphBuilder(seed=14)
    y = conv4(b)  # [N, 4, 4, 4]
    y = b.node("Add", [y, vec(b, (1, 4, 4, 4))], name="near")
    y = b.node("Relu", [y])
    y = b.node("Mul", [y, vec(b, (1, 4, 4, 4))], name="far")
    y = b.node("Mul", [y, vec(b, (1, 4, 1, 1))], name="far_per_channel")
    b.output(b.node("Sigmoid", [y]))
    res = fuse(b.model())
    assert not res.folds
    assert [r.bn for r in res.refusals] == ["near"]
    assert "not a per-channel affine" in res.refusals[0].reason


def test_residual_add_of_two_activations_is_not_a_candidate() -> None:
    b = GraphBuilder(seed=15)
    x = b.input("x", ["N", 4, 6, 6])
    y = b.conv(x, 4, 4, [3, 3], pads=[1, 1, 1, 1])
    y = b.node("Add", [y, x])
    y = b.node("Mul", [y, b.node("Sigmoid", [y])])
    b.output(b.conv(y, 4, 4, [1, 1]))
    res = fuse(b.model())
    assert not res.folds
    assert not res.refusals


def test_constant_broadcasting_the_input_refused() -> None:
    b = GraphBuilder(seed=16)
    x = b.input("x", ["N", 5])
    y = b.node("Gemm", [x, b.weight([5, 6])])
    y = b.node("Mul", [y, vec(b, (1, 1, 6))], name="grows")  # output becomes rank 3
    b.output(y)
    res = fuse(b.model())
    assert not res.folds
    assert "more dimensions than its rank-2 input" in res.refusals[0].reason


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)])
def test_scalar_constants_fold_everywhere(shape: tuple[int, ...]) -> None:
    b = GraphBuilder(seed=17)
    y = conv4(b)
    y = b.node("Mul", [y, vec(b, shape)])
    y = b.node("Add", [vec(b, shape), y])
    b.output(y)
    res = folded(b.model(), 1)
    assert res.folds[0].channels == 1  # one value, applied to all 4 channels


def test_scalar_before_matmul_rank3_folds_forward() -> None:
    b = GraphBuilder(seed=18)
    x = b.input("x", [2, 3, 5])
    y = b.node("Mul", [b.node("Relu", [x]), vec(b, ())])
    y = b.node("Add", [y, vec(b, (5,))])
    b.output(b.node("MatMul", [y, b.weight([5, 4])]))
    res = folded(b.model(), 1)
    assert res.folds[0].direction == "forward"
    assert ops(res.model) == ["Relu", "MatMul", "Add"]


def test_affine_before_valid_conv_folds_forward() -> None:
    b = GraphBuilder(seed=19)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.node("Mul", [b.node("Relu", [x]), vec(b, (1, 3, 1, 1))])
    y = b.node("Add", [y, vec(b, (3, 1, 1))])
    b.output(b.conv(y, 3, 4, [3, 3]))
    res = folded(b.model(), 1)
    assert res.folds[0].rule == "bn-conv"
    assert ops(res.model) == ["Relu", "Conv"]


def test_affine_before_padded_conv_refused() -> None:
    b = GraphBuilder(seed=20)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.node("Add", [b.node("Relu", [x]), vec(b, (1, 3, 1, 1))], name="shift")
    b.output(b.conv(y, 3, 4, [3, 3], pads=[1, 1, 1, 1]))
    res = fuse(b.model())
    assert not res.folds
    assert res.refusals[0].bn == "shift"
    assert "zero padding" in res.refusals[0].reason


def test_affine_before_flatten_gemm_folds_forward() -> None:
    b = GraphBuilder(seed=21)
    x = b.input("x", ["N", 3, 2, 2])
    y = b.node("Mul", [b.node("Relu", [x]), vec(b, (3, 1, 1))])
    y = b.node("Sub", [y, vec(b, (3, 1, 1))])
    y = b.node("Flatten", [y], axis=1)
    b.output(b.node("Gemm", [y, b.weight([12, 5]), vec(b, (5,))]))
    res = folded(b.model(), 1)
    assert res.folds[0].rule == "bn-gemm"


def test_intermediate_is_graph_output_refused() -> None:
    b = GraphBuilder(seed=22)
    y = conv4(b)
    b.output(y)
    b.output(b.node("Mul", [y, vec(b, (1, 4, 1, 1))], name="mul"))
    res = fuse(b.model())
    assert not res.folds
    assert "is a graph output" in res.refusals[0].reason


def test_overridable_initializer_operand() -> None:
    b = GraphBuilder(seed=23)
    y = conv4(b)
    b.output(b.node("Mul", [y, vec(b, (1, 4, 1, 1))], name="mul"))
    m = b.model(ir_version=4)
    k = m.graph.node[-1].input[1]
    m.graph.input.append(helper.make_tensor_value_info(k, TensorProto.FLOAT, [1, 4, 1, 1]))
    res = fuse(m)
    assert not res.folds
    assert "--treat-initializer-inputs-as-constants" in res.refusals[0].reason
    assert len(folded(m, 1, treat_initializer_inputs_as_constants=True).folds) == 1


# ---- constants, dtypes, sharing ------------------------------------------------------


def test_constant_node_operands_are_removed() -> None:
    b = GraphBuilder(seed=24)
    y = conv4(b)
    s = b.node(
        "Constant",
        [],
        value=numpy_helper.from_array(np.linspace(0.5, 2, 4).astype(np.float32).reshape(4, 1, 1)),
    )
    t = b.node("Constant", [], value_float=0.25)
    y = b.node("Mul", [y, s])
    b.output(b.node("Add", [y, t]))
    res = folded(b.model(), 1)
    assert ops(res.model) == ["Conv"]


def test_shared_weight_and_shared_constant_are_not_mutated() -> None:
    b = GraphBuilder(seed=25)
    x = b.input("x", ["N", 3, 6, 6])
    w = b.weight([4, 3, 3, 3])
    s = vec(b, (1, 4, 1, 1))
    y1 = b.node("Mul", [b.node("Conv", [x, w]), s])
    y2 = b.node("Add", [b.node("Mul", [b.node("Conv", [x, w]), s]), vec(b, (1, 4, 1, 1))])
    b.output(y1)
    b.output(y2)
    m = b.model()
    res = folded(m, 2)
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]  # each fold got its own weight


def test_gemm_c_shared_with_the_add_constant() -> None:
    b = GraphBuilder(seed=26)
    x = b.input("x", ["N", 3])
    c = vec(b, (5,))
    y = b.node("Gemm", [x, b.weight([3, 5]), c])
    b.output(b.node("Add", [y, c]))
    folded(b.model(), 1)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_affine_dtypes(dtype: int) -> None:
    b = GraphBuilder(seed=27, dtype=dtype)
    x = b.input("x", ["N", 3])
    y = b.node("MatMul", [x, b.weight([3, 4])])
    y = b.node("Mul", [y, vec(b, (4,))])
    b.output(b.node("Add", [y, vec(b, (4,))]))
    m = b.model()
    res = fuse(m)
    assert len(res.folds) == 1
    assert all(t.data_type == dtype for t in res.model.graph.initializer)
    tol = 2e-2 if dtype == TensorProto.FLOAT16 else 1e-10
    assert_close(m, res.model, rtol=tol, atol=tol)


def test_fp16_overflow_refused() -> None:
    b = GraphBuilder(seed=28, dtype=TensorProto.FLOAT16)
    y = conv4(b)
    b.output(b.node("Mul", [y, b.const(np.full((1, 4, 1, 1), 6e4, np.float16))], name="big"))
    res = fuse(b.model())
    assert not res.folds
    assert "overflow float16" in res.refusals[0].reason


@pytest.mark.parametrize("shape", [(6,), ()])
def test_unknown_rank_needs_a_scalar(shape: tuple[int, ...]) -> None:
    # No shape information and a producer whose rank cannot be proven: a per-channel
    # constant's axis is unknown (refused), a scalar folds.
    b = GraphBuilder(seed=29)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    y = b.node("MatMul", [b.node("Relu", ["x"]), b.weight([5, 6])])
    y = b.node("Mul", [y, vec(b, shape)], name="mul")
    b.outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    m = b.model()
    res = OnnxBackend().fuse(m, FuseOptions())
    if shape:
        assert not res.folds
        assert "cannot prove which axis" in res.refusals[0].reason
    else:
        assert len(res.folds) == 1
        feeds = {"x": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)}
        from onnx_util import ort_run

        np.testing.assert_allclose(ort_run(res.model, feeds)[0], ort_run(m, feeds)[0], rtol=1e-5)


def test_count_affine_nodes() -> None:
    b = GraphBuilder(seed=30)
    y = conv4(b)
    y = b.node("Mul", [y, vec(b, (1, 4, 1, 1))])
    y = b.node("Add", [y, vec(b, (1, 4, 1, 1))])
    y = b.bn(y, 4)
    y = b.node("Add", [b.node("Relu", [y]), vec(b, (1, 4, 1, 1))])  # far from any layer
    b.output(y)
    m = b.model()
    assert count_affine_nodes(m) == {"BatchNormalization": 1, "affine": 2}
    res = fuse(m)
    assert count_affine_nodes(res.model) == {"BatchNormalization": 0, "affine": 0}
    assert all(n.op_type not in AFFINE or n.name.startswith("add") for n in res.model.graph.node)


def test_skip_const_affine() -> None:
    b = GraphBuilder(seed=32)
    y = conv4(b)
    y = b.node("Mul", [b.bn(y, 4), vec(b, (1, 4, 1, 1))])
    b.output(y)
    res = fuse(b.model(), skip_rules=frozenset({"const-affine"}))
    assert [f.kind for f in res.folds] == ["BatchNormalization"]
    assert not res.refusals
    assert ops(res.model) == ["Conv", "Mul"]
