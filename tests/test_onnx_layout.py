"""Normalizations behind layout ops (bnfuse/onnx/layout.py): the Conv1D pattern tf2onnx
writes (Unsqueeze -> Transpose -> Conv -> Squeeze -> Mul -> Add, and Mul -> Add ->
Unsqueeze -> Conv), a Transpose NHWC <-> NCHW between a Conv and its BN, and the refusals
where the channel axis cannot be proved. Outputs compared with ORT optimizations off."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_util import GraphBuilder, assert_close, count_ops

from bnfuse.backend import FuseOptions
from bnfuse.onnx.backend import OnnxBackend
from bnfuse.onnx.count import count_affine_nodes


def fuse(model: onnx.ModelProto, check: bool = True, **opts: object):
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    if check:
        onnx.checker.check_model(res.model, full_check=True)
    return res


def vec(b: GraphBuilder, shape: tuple[int, ...], lo: float = 0.5, hi: float = 2.0) -> str:
    return b.const(b.r.uniform(lo, hi, shape).astype(np.float32), "k")


def conv1d(b: GraphBuilder, x: str, cin: int, cout: int, k: int = 3, **attrs: object) -> str:
    """Keras Conv1D on [N, L, C] as tf2onnx writes it: Unsqueeze(1) -> Transpose to NCHW ->
    Conv with kernel [1, k] -> Squeeze(2), giving [N, C_out, L']."""
    y = b.node("Unsqueeze", [x, b.const(np.array([1]))])
    y = b.node("Transpose", [y], perm=[0, 3, 1, 2])
    y = b.node("Conv", [y, b.weight([cout, cin, 1, k]), vec(b, (cout,), -1, 1)], **attrs)
    return b.node("Squeeze", [y, b.const(np.array([2]))])


def mul_add(b: GraphBuilder, x: str, shape: tuple[int, ...], name: str) -> str:
    y = b.node("Mul", [x, vec(b, shape)], name=name)
    return b.node("Add", [y, vec(b, shape, -1, 1)])


def test_conv1d_backward_through_squeeze() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", 10, 3])
    b.output(mul_add(b, conv1d(b, x, 3, 8), (1, 8, 1), "bn"))
    m = b.model()
    res = fuse(m)
    assert [(f.bn, f.rule, f.direction) for f in res.folds] == [("bn", "layout-bn", "backward")]
    assert [n.op_type for n in res.model.graph.node] == [
        "Unsqueeze",
        "Transpose",
        "Conv",
        "Squeeze",
    ]
    assert_close(m, res.model)


def test_conv1d_forward_through_unsqueeze_into_valid_conv() -> None:
    b = GraphBuilder(seed=2)
    x = b.input("x", ["N", 8, 10])  # channels first, as after a Conv1D's Squeeze
    y = mul_add(b, b.node("Relu", [x]), (1, 8, 1), "bn")
    y = b.node("Unsqueeze", [y, b.const(np.array([2]))])
    y = b.node("Conv", [y, b.weight([4, 8, 1, 3]), vec(b, (4,))])
    b.output(b.node("Squeeze", [y, b.const(np.array([2]))]))
    m = b.model()
    res = fuse(m)
    assert [(f.bn, f.rule, f.direction) for f in res.folds] == [("bn", "layout-forward", "forward")]
    assert count_ops(res.model, "Mul") == count_ops(res.model, "Add") == 0
    assert_close(m, res.model)


def test_forward_into_padded_conv_is_refused() -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 8, 10])
    y = mul_add(b, b.node("Relu", [x]), (1, 8, 1), "bn")
    y = b.node("Unsqueeze", [y, b.const(np.array([2]))])
    b.output(b.node("Conv", [y, b.weight([4, 8, 1, 3])], pads=[0, 1, 0, 1]))
    res = fuse(b.model())
    assert not res.folds
    assert "zero padding" in res.refusals[0].reason


def test_whole_keras_conv1d_block() -> None:
    """Conv1D -> BN -> ReLU -> BN -> Conv1D -> Transpose back to NWC: both BNs fold."""
    b = GraphBuilder(seed=4)
    x = b.input("x", ["N", 12, 3])
    y = mul_add(b, conv1d(b, x, 3, 8), (1, 8, 1), "bn1")
    y = mul_add(b, b.node("Relu", [y]), (1, 8, 1), "bn2")
    y = b.node("Unsqueeze", [y, b.const(np.array([2]))])
    y = b.node("Conv", [y, b.weight([5, 8, 1, 3]), vec(b, (5,))])
    y = b.node("Squeeze", [y, b.const(np.array([2]))])
    b.output(b.node("Transpose", [y], perm=[0, 2, 1]))
    m = b.model()
    assert count_affine_nodes(m)["affine"] == 4
    res = fuse(m)
    assert sorted(f.bn for f in res.folds) == ["bn1", "bn2"] and not res.refusals
    assert count_affine_nodes(res.model) == {"BatchNormalization": 0, "affine": 0}
    assert_close(m, res.model)


@pytest.mark.parametrize("kind", ["bn-node", "mul-add"])
def test_transpose_nchw_to_nhwc_between_conv_and_bn(kind: str) -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.node("Transpose", [b.conv(x, 3, 4, [3, 3])], perm=[0, 2, 3, 1])  # NHWC
    if kind == "mul-add":
        y = mul_add(b, y, (4,), "bn")  # per channel on the last axis
    else:  # a BN in NCHW after the NHWC tensor is transposed back
        y = b.bn(b.node("Transpose", [y], perm=[0, 3, 1, 2]), 4, name="bn")
    b.output(y)
    m = b.model()
    res = fuse(m, forward=False)
    assert [(f.bn, f.rule) for f in res.folds] == [("bn", "layout-bn")]
    assert count_ops(res.model, "BatchNormalization") == count_ops(res.model, "Mul") == 0
    assert_close(m, res.model)


def test_transpose_moving_the_channel_axis_away_is_refused() -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.node("Transpose", [b.conv(x, 3, 6, [1, 1])], perm=[0, 2, 1, 3])  # [N, H, C, W]
    b.output(b.bn(y, 6, name="bn"))  # normalizes axis 1 = the Conv's H
    res = fuse(b.model(), forward=False)
    assert not res.folds
    reason = res.refusals[0].reason
    assert "through Transpose" in reason and "axis 2 of a rank-4 Conv output" in reason


def test_reshape_keeping_channels_folds_and_merging_them_is_refused() -> None:
    for target, ok in (([0, 4, 36], True), ([0, 8, 18], False)):
        b = GraphBuilder(seed=7)
        x = b.input("x", [2, 3, 6, 6])
        y = b.node("Reshape", [b.conv(x, 3, 4, [1, 1]), b.const(np.array(target))])
        b.output(mul_add(b, y, (target[1], 1), "bn"))
        m = b.model()
        res = fuse(m, forward=False)
        if ok:
            assert [f.rule for f in res.folds] == ["layout-bn"]
            assert_close(m, res.model)
        else:
            assert not res.folds
            assert "cannot prove where the channels go" in res.refusals[0].reason


def test_squeeze_without_axes_and_unknown_shape_is_refused() -> None:
    b = GraphBuilder(seed=8)
    x = b.input("x", ["N", 3, 1, "L"])
    y = b.node("Squeeze", [b.conv(x, 3, 4, [1, 1])], name="sq")
    b.output(b.bn(y, 4, name="bn"))
    model = b.model()
    del model.graph.value_info[:]  # shape inference cannot tell the Squeeze's axes
    res = fuse(model, check=False, forward=False)
    assert not res.folds
    assert [r.bn for r in res.refusals] == ["bn"]
    assert "cannot prove which axes Squeeze 'sq' removes" in res.refusals[0].reason


def test_squeeze_output_with_another_reader_is_refused() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", ["N", 10, 3])
    sq = conv1d(b, x, 3, 8)
    b.output(mul_add(b, sq, (1, 8, 1), "bn"))
    conv_out = b.nodes[-3].input[0]  # the Conv's output, read by the Squeeze
    b.output(b.node("Relu", [conv_out]))
    res = fuse(b.model(), forward=False)
    assert not res.folds
    assert "has other consumers" in res.refusals[0].reason


def test_mul_add_pair_far_from_any_layer_is_listed() -> None:
    """Every BN in disguise is in the result: a per-channel Mul -> Add after a pooling
    is refused with a reason, never silently absent; a lone scalar Mul there is not a BN."""
    b = GraphBuilder(seed=10)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.node("MaxPool", [b.conv(x, 3, 4, [3, 3])], kernel_shape=[2, 2])
    y = mul_add(b, y, (1, 4, 1, 1), "bn")
    y = b.node("Mul", [b.node("Relu", [y]), b.const(np.float32(0.5))], name="half")
    b.output(y)
    m = b.model()
    res = fuse(m)
    assert not res.folds
    assert [r.bn for r in res.refusals] == ["bn"]
    assert "no linear layer to fold into" in res.refusals[0].reason
    assert count_affine_nodes(m)["affine"] == 2


def test_identity_between_gemm_and_bn() -> None:
    b = GraphBuilder(seed=11)
    x = b.input("x", ["N", 6])
    y = b.node("Gemm", [x, b.weight([6, 5]), vec(b, (5,))])
    b.output(b.bn(b.node("Identity", [y]), 5, name="bn"))
    m = b.model()
    res = fuse(m)
    assert [f.rule for f in res.folds] == ["layout-bn"]
    assert [n.op_type for n in res.model.graph.node] == ["Gemm", "Identity"]
    assert_close(m, res.model)


def test_opset11_squeeze_axes_attribute() -> None:
    b = GraphBuilder(seed=12)
    x = b.input("x", ["N", 3, 1, 9])
    y = b.node("Squeeze", [b.conv(x, 3, 4, [1, 3])], axes=[2])
    b.output(mul_add(b, y, (4, 1), "bn"))
    m = b.model(opset=11)
    res = fuse(m)
    assert [f.rule for f in res.folds] == ["layout-bn"]
    assert_close(m, res.model)


def test_skip_layout_rules() -> None:
    b = GraphBuilder(seed=13)
    x = b.input("x", ["N", 10, 3])
    b.output(mul_add(b, conv1d(b, x, 3, 8), (1, 8, 1), "bn"))
    res = fuse(b.model(), skip_rules=frozenset({"layout-bn", "layout-forward"}))
    assert not res.folds and [r.bn for r in res.refusals] == ["bn"]


def test_float16_through_layout() -> None:
    b = GraphBuilder(seed=14, dtype=TensorProto.FLOAT16)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.node("Transpose", [b.conv(x, 3, 4, [3, 3])], perm=[0, 2, 3, 1])
    m1 = b.node("Mul", [y, b.const(np.full(4, 1.5, np.float16))], name="bn")
    b.output(b.node("Add", [m1, b.const(np.full(4, 0.25, np.float16))]))
    m = b.model()
    res = fuse(m)
    assert [f.bn for f in res.folds] == ["bn"]
    assert helper.tensor_dtype_to_np_dtype(res.model.graph.initializer[0].data_type) == np.float16
    assert_close(m, res.model, rtol=1e-2, atol=1e-2)


@settings(max_examples=30, deadline=None)
@given(
    perm=st.permutations(range(4)),
    axis=st.integers(0, 4),
    reshape=st.sampled_from([None, "split-last", "merge-last"]),
)
def test_property_fold_through_transpose_and_reshape_is_sound(
    perm: list[int], axis: int, reshape: str | None
) -> None:
    """Conv [2, 6, 4, 5] -> Transpose(perm) [-> Reshape] -> Mul -> Add along one axis:
    bnfuse folds exactly when that axis is where the Conv's channels went (and a Reshape
    keeps it), and a fold never changes the output."""
    b = GraphBuilder(seed=sum(perm) + axis)
    x = b.input("x", [2, 3, 4, 5])
    y = b.node("Transpose", [b.conv(x, 3, 6, [1, 1])], perm=list(perm))
    dims = [[2, 6, 4, 5][p] for p in perm]
    channel = list(perm).index(1)
    if reshape is not None:
        # split the last axis in two, or merge the last two: the other axes keep place
        if reshape == "split-last":
            new = [*dims[:3], 1, dims[3]]
            channel = 4 if channel == 3 else channel
        else:
            new = [*dims[:2], dims[2] * dims[3]]
            channel = -1 if channel >= 2 else channel  # merged away
        y = b.node("Reshape", [y, b.const(np.array(new))])
        dims = new
    axis = axis % len(dims)
    shape = [1] * len(dims)
    shape[axis] = dims[axis]
    y = b.node("Mul", [y, vec(b, tuple(shape))], name="bn")
    b.output(b.node("Add", [y, vec(b, tuple(shape), -1, 1)]))
    m = b.model()
    res = fuse(m, forward=False)
    listed = [f.bn for f in res.folds] + [r.bn for r in res.refusals]
    assert "bn" in listed  # always reported
    expect = axis == channel or dims[axis] == 1
    assert (len(res.folds) == 1) == expect, (perm, axis, reshape, res.refusals)
    if res.folds:
        assert_close(m, res.model)


def test_reshape_with_an_equal_size_elsewhere_is_refused() -> None:
    """Conv [2, 4, 3, 4] -> Reshape [2, 3, 4, 4]: output axis 2 has the channels' size but
    not their place (4 elements after it, not 12): a per-axis-2 affine is not per channel."""
    b = GraphBuilder(seed=15)
    x = b.input("x", [2, 3, 3, 4])
    y = b.node("Reshape", [b.conv(x, 3, 4, [1, 1]), b.const(np.array([2, 3, 4, 4]))])
    b.output(mul_add(b, y, (1, 1, 4, 1), "bn"))
    res = fuse(b.model(), forward=False)
    assert not res.folds
    assert "cannot prove where the channels go" in res.refusals[0].reason
