"""Every refusal reason of the ONNX pass, one negative test each (reason text asserted);
the reasons added later are tested in tests/test_onnx_refusal_reasons.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_util import GraphBuilder, assert_close

from bnfuse.backend import FuseOptions
from bnfuse.onnx.backend import OnnxBackend


def fuse(model: onnx.ModelProto, check: bool = True, **opts: object):
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    if check:
        onnx.checker.check_model(res.model, full_check=True)
    return res


def conv_bn(seed: int = 0, **bn_attrs: object) -> tuple[GraphBuilder, str, str]:
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, [3, 3])
    y = b.bn(c, 4, name="bn", **bn_attrs)
    return b, c, y


def only_refusal(res) -> str:
    assert not res.folds, res.folds
    assert len(res.refusals) == 1
    assert res.refusals[0].bn == "bn"
    return res.refusals[0].reason


def test_intermediate_has_other_consumer() -> None:
    b, c, y = conv_bn()
    b.output(y)
    b.output(b.node("Relu", [c]))
    assert "has other consumers" in only_refusal(fuse(b.model(), forward=False))


def test_intermediate_is_graph_output() -> None:
    b, c, y = conv_bn()
    b.output(y)
    b.output(c)
    assert "is a graph output" in only_refusal(fuse(b.model(), forward=False))


def test_weight_is_graph_input() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", 3, 6, 6])
    w = b.input("w", [4, 3, 3, 3])
    y = b.bn(b.node("Conv", [x, w]), 4, name="bn")
    b.output(y)
    assert "'w' is a graph input, not a constant" in only_refusal(fuse(b.model()))


def test_initializer_listed_as_graph_input_is_overridable() -> None:
    b, _c, y = conv_bn(seed=2)
    b.output(y, ["N", 4, 4, 4])
    m = b.model(ir_version=4)
    w = m.graph.node[0].input[1]
    m.graph.input.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, [4, 3, 3, 3]))
    reason = only_refusal(fuse(m))
    assert "also listed as a graph input" in reason
    assert "--treat-initializer-inputs-as-constants" in reason
    res = fuse(m, treat_initializer_inputs_as_constants=True)
    assert len(res.folds) == 1


def test_bn_param_not_constant() -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    mean = b.input("mean", [4])
    c = b.conv(x, 3, 4, [3, 3])
    p = [b.const(np.ones(4, np.float32)) for _ in range(3)]
    y = b.node("BatchNormalization", [c, p[0], p[1], mean, p[2]], name="bn")
    b.output(y)
    assert "BN parameter 'mean' is a graph input" in only_refusal(fuse(b.model()))


def test_training_mode() -> None:
    b, _c, y = conv_bn(seed=4, training_mode=1)
    b.output(y, ["N", 4, 4, 4])
    assert "training mode (training_mode=1)" in only_refusal(fuse(b.model(), check=False))


def test_optional_outputs_used() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, [3, 3])
    p = [
        b.const(v)
        for v in (
            np.ones(4, np.float32),
            np.zeros(4, np.float32),
            np.zeros(4, np.float32),
            np.ones(4, np.float32),
        )
    ]
    b.nodes.append(
        helper.make_node(
            "BatchNormalization", [c, *p], ["y", "rm", "rv"], name="bn", training_mode=1
        )
    )
    b.output("y")
    b.output("rm")
    b.output("rv")
    res = fuse(b.model(opset=15))
    assert "training outputs" in only_refusal(res)


@pytest.mark.parametrize(
    ("var", "mean", "expect"),
    [
        (np.array([-1.0, 1, 1, 1]), np.zeros(4), "variance + epsilon <= 0"),
        (np.array([-1e-5, 1, 1, 1]), np.zeros(4), "variance + epsilon <= 0"),
        (np.ones(4), np.array([np.nan, 0, 0, 0]), "non-finite BN mean"),
        (np.array([np.inf, 1, 1, 1]), np.zeros(4), "non-finite BN variance"),
    ],
)
def test_bad_statistics(var: np.ndarray, mean: np.ndarray, expect: str) -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, [3, 3])
    p = [b.const(v.astype(np.float32)) for v in (np.ones(4), np.zeros(4), mean, var)]
    y = b.node("BatchNormalization", [c, *p], name="bn", epsilon=1e-5)
    b.output(y)
    assert expect in only_refusal(fuse(b.model()))


def test_no_linear_neighbour() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.bn(b.node("Relu", [x]), 3, name="bn")
    b.output(b.node("Relu", [y]))
    assert "no linear layer to fold into" in only_refusal(fuse(b.model()))


def test_channel_count_mismatch_refused() -> None:
    # A Conv whose output channel count differs from the BN's cannot fold (malformed model).
    b = GraphBuilder(seed=8)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, [3, 3])
    y = b.bn(c, 4, name="bn")
    b.output(y)
    m = b.model()
    conv_w = next(i for i in m.graph.initializer if i.name == m.graph.node[0].input[1])
    conv_w.CopyFrom(onnx.numpy_helper.from_array(np.ones((5, 3, 3, 3), np.float32), conv_w.name))
    bias = next(i for i in m.graph.initializer if i.name == m.graph.node[0].input[2])
    bias.CopyFrom(onnx.numpy_helper.from_array(np.ones(5, np.float32), bias.name))
    assert "has 4 channels but Conv output has 5" in only_refusal(fuse(m, check=False))


def test_excluded_bn_stays() -> None:
    b, _c, y = conv_bn(seed=9)
    b.output(y)
    assert only_refusal(fuse(b.model(), exclude=frozenset({"bn"}))) == "excluded (rolled back)"


def test_skip_rule() -> None:
    b, _c, y = conv_bn(seed=10)
    b.output(y)
    m = b.model()
    res = fuse(m, skip_rules=frozenset({"conv-bn"}))
    assert not res.folds
    assert len(fuse(m).folds) == 1


def test_refused_model_still_runs_identically() -> None:
    b, c, y = conv_bn(seed=11)
    b.output(y)
    b.output(b.node("Relu", [c]))
    m = b.model()
    res = fuse(m, forward=False)
    assert_close(m, res.model)


def test_flatten_output_that_is_a_graph_output_is_named_so() -> None:
    b = GraphBuilder(seed=41)
    x = b.input("x", ["N", 4, 3, 3])
    y = b.bn(b.node("Relu", [x]), 4, name="bn")
    flat = b.node("Flatten", [y], name="flat")
    b.output(flat)
    b.output(b.node("Gemm", [flat, b.weight([36, 5])]))
    assert only_refusal(fuse(b.model())) == "Flatten output 'flat_out' is a graph output"


def test_forward_fold_into_several_rules_names_each() -> None:
    # one BN folded forward into a Flatten -> Gemm and a valid Conv: both rules named
    b = GraphBuilder(seed=42)
    x = b.input("x", ["N", 4, 3, 3])
    y = b.bn(b.node("Relu", [x]), 4, name="bn")
    b.output(b.node("Gemm", [b.node("Flatten", [y]), b.weight([36, 5])]))
    b.output(b.node("Conv", [y, b.weight([2, 4, 3, 3])]))
    m = b.model()
    res = fuse(m)
    assert [(f.bn, f.direction, f.rule) for f in res.folds] == [
        ("bn", "forward", "bn-gemm+bn-conv")
    ]
    assert_close(m, res.model)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("group", [0, 3])
def test_bn_before_a_conv_whose_group_does_not_divide_is_refused(op: str, group: int) -> None:
    """BN -> Conv/ConvTranspose with group=0, or a group that does not divide the
    weight's first axis (4 channels, group 3): a malformed node, refused - not a crash."""
    b = GraphBuilder(seed=9)
    x = b.input("x", ["N", 4, 5, 5])
    y = b.bn(b.node("Relu", [x]), 4, eps=1e-3, name="bn")
    shape = [4, 1, 1, 1] if op == "Conv" else [4, 2, 1, 1]
    b.output(b.node(op, [y, b.weight(shape)], group=group))
    res = fuse(b.model(), check=False)
    reason = only_refusal(res)
    assert ("group=0" in reason) if group == 0 else ("do not divide into group=3" in reason)
