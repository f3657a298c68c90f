"""The refusal reasons of the ONNX pass that tests/test_onnx_refusals.py did not reach,
one negative test each (reason text asserted), and the cases where a wrong fold would be
silently wrong (each was a surviving one-line mutation of a rule: see issue 13).

Malformed models are built on purpose for some reasons (a BN with three inputs, a 3-D
Gemm B): bnfuse must refuse them with a reason, never crash or fold them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_util import GraphBuilder, assert_close, ort_run, random_feeds

from bnfuse.backend import FuseOptions, PassResult
from bnfuse.onnx.backend import OnnxBackend
from bnfuse.onnx.rules import PAD_REASON


def fuse(model: onnx.ModelProto, check: bool = True, **opts: object) -> PassResult:
    before = model.SerializeToString()
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    assert model.SerializeToString() == before, "input model was mutated"
    if check:
        onnx.checker.check_model(res.model, full_check=True)
    return res


def refusal(model: onnx.ModelProto, bn: str = "bn", check: bool = True, **opts: object) -> str:
    """The one refusal of ``model`` (of normalization ``bn``); nothing may fold."""
    res = fuse(model, check, **opts)
    assert not res.folds, res.folds
    assert [r.bn for r in res.refusals] == [bn], res.refusals
    return res.refusals[0].reason


def shapeless_input(b: GraphBuilder, name: str = "x") -> str:
    """A graph input declared without any shape (its rank cannot be proven)."""
    b.inputs.append(helper.make_tensor_value_info(name, b.dtype, None))
    return name


def relu_bn(b: GraphBuilder, shape: list | None, c: int, **attrs: Any) -> str:
    """x -> Relu -> BN named "bn" (no layer before it: only a forward fold can apply)."""
    x = b.input("x", shape) if shape is not None else shapeless_input(b)
    return b.bn(b.node("Relu", [x]), c, name="bn", **attrs)


def bn_node(b: GraphBuilder, x: str, params: list[str], **attrs: Any) -> str:
    b.nodes.append(helper.make_node("BatchNormalization", [x, *params], ["y"], name="bn", **attrs))
    return "y"


# ---- the net under the refactor: mutations that used to survive -----------------------


def test_forward_gemm_with_trans_a_refused_even_when_square() -> None:
    """Gemm(transA=1) reduces over the BN's *batch* axis; with M == K every count matches,
    so only the transA check stands between this model and a wrong fold."""
    b = GraphBuilder(seed=101)
    y = relu_bn(b, [4, 4], 4)
    b.output(b.node("Gemm", [y, b.weight([4, 5])], transA=1))
    m = b.model()
    reason = refusal(m)
    assert reason == (
        "Gemm transposes its input (transA=1): BN channel axis is not the reduced axis"
    )
    assert_close(m, fuse(m).model)


def test_forward_conv_with_same_lower_padding_refused() -> None:
    """auto_pad=SAME_LOWER pads like explicit pads: a BN shift cannot cross it."""
    b = GraphBuilder(seed=102)
    y = relu_bn(b, ["N", 4, 7, 7], 4)
    b.output(b.conv(y, 4, 6, [3, 3], auto_pad="SAME_LOWER"))
    m = b.model()
    assert refusal(m) == PAD_REASON
    assert_close(m, fuse(m).model)


def test_forward_conv_with_valid_auto_pad_folds() -> None:
    """The other side of the padding check: auto_pad=VALID adds no border, so it folds."""
    b = GraphBuilder(seed=103)
    y = relu_bn(b, ["N", 4, 7, 7], 4)
    b.output(b.conv(y, 4, 6, [3, 3], auto_pad="VALID"))
    m = b.model()
    res = fuse(m)
    assert [(f.bn, f.direction) for f in res.folds] == [("bn", "forward")]
    assert_close(m, res.model)


def test_matmul_bias_of_shape_n_by_1_is_not_per_channel() -> None:
    """A [N, 1] bias with N equal to the channel count adds per ROW (per sample here), not
    per output channel: read as a channel vector it would fold into a wrong bias."""
    b = GraphBuilder(seed=104)
    x = b.input("x", [4, 6])
    mm = b.node("MatMul", [x, b.weight([6, 4])])
    add = b.node("Add", [mm, b.weight([4, 1], "bias")])
    b.output(b.bn(add, 4, name="bn"))
    m = b.model()
    assert refusal(m, forward=False) == "Add bias of shape [4, 1] is not per output channel"
    assert_close(m, fuse(m).model)


def test_overridable_initializer_is_never_rewritten_in_place() -> None:
    """An initializer also listed as a graph input is a default the caller may override:
    folding (when told it is fixed) writes the new weight under a new name and leaves the
    input's default untouched, so an override still means what it meant."""
    b = GraphBuilder(seed=105)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, [3, 3])
    b.output(b.bn(c, 4, name="bn"), ["N", 4, 4, 4])
    m = b.model(ir_version=4)
    conv = m.graph.node[0]
    w_name = conv.input[1]
    w_before = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}[w_name]
    m.graph.input.append(
        helper.make_tensor_value_info(w_name, TensorProto.FLOAT, list(w_before.shape))
    )
    res = fuse(m, treat_initializer_inputs_as_constants=True)
    assert [f.bn for f in res.folds] == ["bn"]
    inits = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert np.array_equal(inits[w_name], w_before)
    assert res.model.graph.node[0].input[1] != w_name
    feeds = random_feeds(m)
    feeds[w_name] = w_before  # the caller passes the default explicitly
    for a, f in zip(ort_run(m, feeds), ort_run(res.model, feeds), strict=True):
        np.testing.assert_allclose(f, a, rtol=1e-4, atol=1e-4)


# ---- BatchNormalization itself ------------------------------------------------------------


def test_bn_with_fewer_than_five_inputs() -> None:
    b = GraphBuilder(seed=110)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    y = bn_node(b, c, [b.const(np.ones(4, np.float32)) for _ in range(2)])
    b.output(y)
    reason = refusal(b.model(), check=False)
    assert reason == "malformed BatchNormalization (fewer than 5 inputs)"


def test_bn_spatial_0_normalizes_every_element() -> None:
    b = GraphBuilder(seed=111)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    params = [b.const(np.full((4, 4, 4), v, np.float32)) for v in (1.0, 0.0, 0.0, 1.0)]
    b.output(bn_node(b, c, params, spatial=0, is_test=1))
    reason = refusal(b.model(opset=6), check=False)
    assert reason == "BatchNormalization with spatial=0 normalizes every element, not per channel"


def test_bn_training_mode_is_test_0() -> None:
    b = GraphBuilder(seed=112)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    params = [b.const(np.full(4, v, np.float32)) for v in (1.0, 0.0, 0.0, 1.0)]
    b.output(bn_node(b, c, params, is_test=0))
    reason = refusal(b.model(opset=6), check=False)
    assert reason == "BatchNormalization is in training mode (is_test=0)"


def test_bn_params_not_vectors() -> None:
    b = GraphBuilder(seed=113)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    params = [b.const(np.full((4, 1), v, np.float32)) for v in (1.0, 0.0, 0.0, 1.0)]
    b.output(bn_node(b, c, params))
    assert refusal(b.model(), check=False) == "BN parameters are not per-channel vectors"


def test_bn_params_of_different_lengths() -> None:
    b = GraphBuilder(seed=114)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    params = [b.const(np.full(n, 1.0, np.float32)) for n in (4, 4, 4, 3)]
    b.output(bn_node(b, c, params))
    assert refusal(b.model(), check=False) == "BN parameters have different lengths"


def test_bn_param_missing() -> None:
    b = GraphBuilder(seed=115)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    params = [b.const(np.full(4, v, np.float32)) for v in (1.0, 0.0, 0.0)]
    b.output(bn_node(b, c, [params[0], params[1], "", params[2]]))
    assert refusal(b.model(), check=False) == "BN parameter missing input"


# ---- backward rules --------------------------------------------------------------------


def test_conv_without_weight() -> None:
    b = GraphBuilder(seed=120)
    c = b.node("Conv", [b.input("x", ["N", 4, 6, 6])])
    b.output(b.bn(c, 4, name="bn"))
    assert refusal(b.model(), check=False, forward=False) == "Conv has no weight"


def test_conv_integer_weight() -> None:
    b = GraphBuilder(seed=121)
    w = b.const(np.ones((4, 3, 3, 3), np.int8), "Wint")
    c = b.node("Conv", [b.input("x", ["N", 3, 6, 6]), w])
    b.output(b.bn(c, 4, name="bn"))
    reason = refusal(b.model(), check=False, forward=False)
    assert reason == f"weight {w!r} is not a floating-point tensor"


def test_conv_bias_is_a_graph_input() -> None:
    b = GraphBuilder(seed=122)
    x = b.input("x", ["N", 3, 6, 6])
    bias = b.input("bias", [4])
    c = b.node("Conv", [x, b.weight([4, 3, 3, 3]), bias])
    b.output(b.bn(c, 4, name="bn"))
    reason = refusal(b.model(), forward=False)
    assert reason == "Conv bias 'bias' is a graph input, not a constant"


def test_conv_transpose_group_does_not_divide_input_channels() -> None:
    b = GraphBuilder(seed=123)
    x = b.input("x", ["N", 4, 5, 5])
    c = b.node("ConvTranspose", [x, b.weight([4, 2, 3, 3])], group=3)
    b.output(b.bn(c, 6, name="bn"))
    reason = refusal(b.model(), check=False, forward=False)
    assert reason == "ConvTranspose weight has 4 input channels, not divisible by group=3"


def test_gemm_b_not_2d() -> None:
    b = GraphBuilder(seed=124)
    x = b.input("x", ["N", 3])
    c = b.node("Gemm", [x, b.weight([3, 4, 1])])
    b.output(b.bn(c, 4, name="bn"))
    assert refusal(b.model(), check=False, forward=False) == "Gemm B is not 2-D"


def test_matmul_output_rank_unknown() -> None:
    b = GraphBuilder(seed=125)
    x = shapeless_input(b)  # the MatMul output's rank cannot be proven
    b.output(b.bn(b.node("MatMul", [x, b.weight([3, 4])]), 4, name="bn"))
    reason = refusal(b.model(), check=False, forward=False)
    assert reason == "cannot prove the MatMul output rank (no shape information)"


def test_matmul_weight_3d() -> None:
    b = GraphBuilder(seed=126)
    x = b.input("x", [2, 5, 3])
    mm = b.node("MatMul", [x, b.weight([2, 3, 4])])
    b.output(b.node("Mul", [mm, b.const(np.full(4, 2.0, np.float32))], name="mul"))
    reason = refusal(b.model(), bn="mul", forward=False)
    assert reason == "MatMul weight is 3-D, not 2-D"


def test_reshape_after_matmul_with_unprovable_last_axis() -> None:
    b = GraphBuilder(seed=127)
    x = b.input("x", ["N", 3])
    shape = b.input("shape", [2], TensorProto.INT64)
    r = b.node("Reshape", [b.node("MatMul", [x, b.weight([3, 4])]), shape])
    b.output(b.node("Mul", [r, b.const(np.full(4, 2.0, np.float32))], name="mul"))
    reason = refusal(b.model(), bn="mul", forward=False)
    assert reason == "cannot prove that the Reshape after the MatMul keeps the last axis"


def test_reshape_after_matmul_changes_the_last_axis() -> None:
    # a one-channel BN passes the channel count check, so only the Reshape check refuses
    b = GraphBuilder(seed=128)
    x = b.input("x", [2, 3])
    mm = b.node("MatMul", [x, b.weight([3, 4])])
    r = b.node("Reshape", [mm, b.const(np.array([4, 2], np.int64))])
    b.output(b.bn(r, 1, name="bn"))
    reason = refusal(b.model(), check=False, forward=False)
    assert reason == "the Reshape after the MatMul changes the last axis (4 -> 2)"


# ---- forward rules ---------------------------------------------------------------------


def test_bn_output_is_a_conv_weight() -> None:
    b = GraphBuilder(seed=130)
    w = relu_bn(b, [4, 4, 3, 3], 4)
    b.output(b.node("Conv", [b.input("x2", ["N", 4, 6, 6]), w], name="conv"))
    assert refusal(b.model()) == "BatchNormalization output feeds Conv 'conv' as a weight"


def test_bn_output_is_a_matmul_weight() -> None:
    b = GraphBuilder(seed=131)
    w = relu_bn(b, [3, 4], 4)
    b.output(b.node("MatMul", [b.input("x2", ["N", 3]), w], name="mm"))
    assert refusal(b.model()) == "BatchNormalization output feeds MatMul 'mm' as its weight"


def test_forward_matmul_weight_not_2d() -> None:
    b = GraphBuilder(seed=132)
    y = relu_bn(b, [5, 4], 4)
    b.output(b.node("MatMul", [y, b.weight([2, 4, 3])]))
    assert refusal(b.model(), check=False) == "MatMul weight is not 2-D"


def test_forward_matmul_input_rank_unknown() -> None:
    b = GraphBuilder(seed=133)
    y = relu_bn(b, None, 4)
    b.output(b.node("MatMul", [y, b.weight([4, 3])]))
    reason = refusal(b.model(), check=False)
    assert reason == "cannot prove the rank of the MatMul input (no shape information)"


def test_forward_gemm_feature_count_mismatch() -> None:
    b = GraphBuilder(seed=134)
    y = relu_bn(b, ["N", 4], 4)
    b.output(b.node("Gemm", [y, b.weight([5, 3])]))
    assert refusal(b.model(), check=False) == "BatchNormalization gives 4 features but Gemm takes 5"


def test_forward_bn_output_is_a_graph_output() -> None:
    b = GraphBuilder(seed=135)
    y = relu_bn(b, ["N", 4, 5, 5], 4)
    b.output(y)
    b.output(b.conv(y, 4, 2, [1, 1]))
    assert refusal(b.model()) == "BatchNormalization output is a graph output"


@pytest.mark.parametrize(
    ("shape", "op", "expect"),
    [
        (None, "Flatten", "cannot prove the Flatten feature order (unknown input shape)"),
        (["N", 4, 3, 3], "Flatten2", "Flatten axis is not 1"),
        (["N", 4, 3, 3], "ReshapeInput", "Reshape shape is not a constant"),
        (["N", 4, 3, 3], "Reshape3", "Reshape to [0, 4, 9] is not a provable flatten"),
    ],
)
def test_flatten_reasons(shape: list | None, op: str, expect: str) -> None:
    b = GraphBuilder(seed=136)
    y = relu_bn(b, shape, 4)
    if op == "Flatten":
        flat = b.node("Flatten", [y])
    elif op == "Flatten2":
        flat = b.node("Flatten", [y], axis=2)
    elif op == "ReshapeInput":
        flat = b.node("Reshape", [y, b.input("shape", [2], TensorProto.INT64)])
    else:
        flat = b.node("Reshape", [y, b.const(np.array([0, 4, 9], np.int64))])
    b.output(b.node("MatMul", [flat, b.weight([36, 5])]))
    assert refusal(b.model(), check=False) == expect


def test_flatten_of_a_batch_axis_affine() -> None:
    b = GraphBuilder(seed=137)
    x = b.node("Relu", [b.input("x", [2, 4, 3, 3])])
    y = b.node("Mul", [x, b.const(np.array([2.0, 3.0], np.float32).reshape(2, 1, 1, 1))])
    b.nodes[-1].name = "bn"
    flat = b.node("Flatten", [y])
    b.output(b.node("Gemm", [flat, b.weight([36, 5])]))
    assert refusal(b.model()) == "Mul acts on axis 0 of a rank-4 tensor (the batch axis)"


def test_flatten_channel_count_mismatch() -> None:
    b = GraphBuilder(seed=138)
    y = relu_bn(b, ["N", 4, 3, 3], 3)  # a malformed BN: 3 parameters, 4 channels
    flat = b.node("Flatten", [y])
    b.output(b.node("Gemm", [flat, b.weight([36, 5])]))
    reason = refusal(b.model(), check=False)
    assert reason == "BatchNormalization has 3 channels but axis 1 of its input has 4"


def test_forward_into_a_function_call_site_attribute() -> None:
    """A Conv inside a function whose attribute comes from the call site: its value is
    not known where the body is folded."""
    r = np.random.default_rng(139)
    params = [
        numpy_helper.from_array(p, f"p{i}")
        for i, p in enumerate(
            [
                np.ones(4, np.float32),
                np.zeros(4, np.float32),
                r.normal(size=4).astype(np.float32),
                np.ones(4, np.float32),
            ]
        )
    ]
    w = numpy_helper.from_array(r.normal(size=(4, 4, 1, 1)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["c_in", "w"], ["fy"], name="conv")
    group = conv.attribute.add()
    group.name = "group"
    group.ref_attr_name = "g"
    group.type = onnx.AttributeProto.INT
    body = [
        *(helper.make_node("Constant", [], [p.name], value=p) for p in [*params, w]),
        helper.make_node("Relu", ["fx"], ["relu"]),
        helper.make_node(
            "BatchNormalization", ["relu", *(p.name for p in params)], ["c_in"], name="bn"
        ),
        conv,
    ]
    fn = helper.make_function(
        "my.domain", "F", ["fx"], ["fy"], body, [helper.make_opsetid("", 17)], ["g"]
    )
    g = helper.make_graph(
        [helper.make_node("F", ["x"], ["y"], name="call", domain="my.domain", g=1)],
        "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3, 3])],
    )
    m = helper.make_model(
        g,
        functions=[fn],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)],
    )
    reason = refusal(m)
    assert reason == "Conv 'conv' takes attribute(s) group from the enclosing function's call site"


# ---- Mul/Add/Sub/Div affines (onnx/affine.py) ----------------------------------------------


@pytest.mark.parametrize(
    ("op", "const", "cout", "expect"),
    [
        (
            "Mul",
            np.full((1, 1, 1, 1, 1), 2.0, np.float32),
            4,
            "Mul constant of shape [1, 1, 1, 1, 1] has more dimensions than its input (rank 4):"
            " it would broadcast the input",
        ),
        (
            "Mul",
            np.ones((2, 4, 1, 1), np.float32),
            4,
            "Mul constant of shape [2, 4, 1, 1] varies along axes [0, 1] of its rank-4 input:"
            " not a per-channel affine",
        ),
        (
            "Add",
            np.ones((1, 4, 1, 1), np.float32),
            1,
            "Add constant of shape [1, 4, 1, 1] broadcasts axis 1 of its input (size 1):"
            " not a per-channel affine",
        ),
        (
            "Mul",
            np.array([1.0, np.nan, 1.0, 1.0], np.float32).reshape(1, 4, 1, 1),
            4,
            "Mul constant is not finite (NaN or Inf)",
        ),
        (
            "Mul",
            np.where(np.arange(16) == 3, np.inf, 1.0).astype(np.float32).reshape(1, 4, 2, 2),
            4,
            "Mul constant is not finite (NaN or Inf)",
        ),
    ],
)
def test_affine_reasons(op: str, const: np.ndarray, cout: int, expect: str) -> None:
    b = GraphBuilder(seed=140)
    x = b.input("x", ["N", 3, 3, 3])
    c = b.conv(x, 3, cout, [2, 2])  # output [N, cout, 2, 2]
    b.output(b.node(op, [c, b.const(const)], name="bn"))
    assert refusal(b.model(), check=False) == expect


def test_affine_non_finite_in_float64() -> None:
    """Div by a float64 constant so small that its reciprocal overflows float64."""
    b = GraphBuilder(seed=141, dtype=TensorProto.DOUBLE)
    x = b.input("x", ["N", 3, 3, 3])
    c = b.conv(x, 3, 4, [2, 2])
    tiny = np.array([1.0, 1e-320, 1.0, 1.0]).reshape(1, 4, 1, 1)
    b.output(b.node("Div", [c, b.const(tiny)], name="bn"))
    assert refusal(b.model()) == "Div constant gives a non-finite affine"


def test_affine_scalar_with_more_dims_than_an_unknown_rank() -> None:
    b = GraphBuilder(seed=142)
    x = shapeless_input(b)
    c = b.node("MatMul", [x, b.weight([3, 4])])
    b.output(b.node("Mul", [c, b.const(np.full((1, 1), 2.0, np.float32))], name="bn"))
    reason = refusal(b.model(), check=False)
    assert reason == (
        "Mul constant of shape [1, 1] has more dimensions than its input (rank unknown):"
        " it would broadcast the input"
    )


def test_bn_param_undefined_in_a_damaged_model(tmp_path: Path) -> None:
    """A damaged model reads a tensor nothing defines: the BN is refused with that reason,
    and the pass's own postcondition (no tensor lost its producer) does not take the
    pre-existing dangling read for a bnfuse bug (the ONNX fuzz found this)."""
    import bnfuse

    b = GraphBuilder(seed=116)
    c = b.conv(b.input("x", ["N", 3, 6, 6]), 3, 4, [3, 3])
    params = [b.const(np.full(4, v, np.float32)) for v in (1.0, 0.0, 0.0)]
    b.output(bn_node(b, c, [params[0], params[1], "ghost", params[2]]), ["N", 4, 4, 4])
    m = b.model()
    assert refusal(m, check=False) == "BN parameter 'ghost' is not defined"
    path = tmp_path / "damaged.onnx"
    path.write_bytes(m.SerializeToString())
    res = bnfuse.fuse(path, samples=1)  # FusionInvariantError here was the bug
    assert [(r.bn, r.reason) for r in res.refusals] == [
        ("bn", "BN parameter 'ghost' is not defined")
    ]


@pytest.mark.parametrize(
    ("op", "const_first"), [("Sub", False), ("Sub", True), ("Div", False), ("Add", True)]
)
def test_elementwise_sub_and_div_fold_through_flatten(op: str, const_first: bool) -> None:
    """An element-wise (per-pixel) Sub or Div before Flatten -> Gemm folds exactly, in
    both operand orders of Sub (c - x negates the scale)."""
    b = GraphBuilder(seed=150)
    x = b.input("x", ["N", 4, 5])
    c = b.const(b.r.uniform(0.5, 2, (1, 4, 5)).astype(np.float32))
    y = b.node(op, [c, x] if const_first else [x, c], name="bn")
    b.output(b.node("Gemm", [b.node("Flatten", [y]), b.weight([20, 3])]))
    m = b.model()
    res = fuse(m)
    assert [(f.bn, f.direction, f.kind) for f in res.folds] == [("bn", "forward", op)]
    assert_close(m, res.model)


def test_elementwise_div_by_zero_refused() -> None:
    b = GraphBuilder(seed=151)
    x = b.input("x", ["N", 4, 5])
    c = np.ones((1, 4, 5), np.float32)
    c[0, 2, 3] = 0.0
    y = b.node("Div", [x, b.const(c)], name="bn")
    b.output(b.node("Gemm", [b.node("Flatten", [y]), b.weight([20, 3])]))
    assert refusal(b.model()) == "Div by a constant that contains 0"


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_fold_that_overflows_float16_names_the_layer(direction: str) -> None:
    b = GraphBuilder(seed=152, dtype=TensorProto.FLOAT16)
    x = b.input("x", ["N", 2, 3, 3])
    w = b.const(np.full((2, 2, 1, 1), 30000, np.float16))
    params = [np.full(2, 4, np.float16), np.zeros(2, np.float16)]
    params += [np.zeros(2, np.float16), np.ones(2, np.float16)]
    names = [b.const(p) for p in params]
    if direction == "backward":
        c = b.node("Conv", [x, w], name="conv")
        b.output(b.node("BatchNormalization", [c, *names], name="bn"))
    else:
        y = b.node("BatchNormalization", [b.node("Relu", [x]), *names], name="bn")
        b.output(b.node("Conv", [y, w], name="conv"))
    res = fuse(b.model())
    assert not res.folds
    assert [(r.bn, r.reason, r.code) for r in res.refusals] == [
        ("bn", "folded values of 'conv' overflow float16 (fold refused)", "overflow")
    ]
