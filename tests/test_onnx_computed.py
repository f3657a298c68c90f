"""Constants the graph computes (bnfuse/onnx/constants.py): dynamo-style Conv biases, BN
parameters behind Identity/Cast chains, and the refusals when a subgraph cannot be
evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_util import GraphBuilder, assert_close, count_ops

from bnfuse.backend import FuseOptions
from bnfuse.onnx.backend import OnnxBackend


def fuse(model: onnx.ModelProto, **opts: object):
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    onnx.checker.check_model(res.model, full_check=True)
    return res


def dynamo_conv(b: GraphBuilder, x: str, cin: int, cout: int, k: int = 3) -> str:
    """A Conv without bias as torch.onnx.export(dynamo=True, optimize=False) writes it:
    bias = Expand(CastLike(Constant 0.0, x), Expand(Shape(W, start=0, end=1), [1]))."""
    w = b.weight([cout, cin, k, k])
    zero = b.node("Constant", [], value=numpy_helper.from_array(np.array(0.0, np.float32)))
    zero = b.node("CastLike", [zero, x])
    dim0 = b.node("Shape", [w], start=0, end=1)
    one = b.node("Constant", [], value_ints=[1])
    shape = b.node("Expand", [dim0, one])
    bias = b.node("Expand", [zero, shape])
    return b.node("Conv", [x, w, bias], pads=[1, 1, 1, 1])


def dynamo_model(seed: int = 0, blocks: int = 2) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    y = b.input("x", ["N", 3, 8, 8])
    cin = 3
    for i in range(blocks):
        y = b.node("Relu", [b.bn(dynamo_conv(b, y, cin, 4 + i), 4 + i)])
        cin = 4 + i
    b.output(y)
    return b.model(opset=18)


def test_dynamo_conv_bias_is_computed_and_folds() -> None:
    m = dynamo_model()
    res = fuse(m)
    assert len(res.folds) == 2 and not res.refusals, res.refusals
    assert count_ops(res.model, "BatchNormalization") == 0
    # the computing nodes are gone, nothing else was simplified
    assert {n.op_type for n in res.model.graph.node} == {"Conv", "Relu"}
    for conv in (n for n in res.model.graph.node if n.op_type == "Conv"):
        assert conv.input[2] in {t.name for t in res.model.graph.initializer}
    assert_close(m, res.model)


def test_computed_bias_shared_with_other_consumer_is_kept() -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    y = dynamo_conv(b, x, 3, 4)
    bias = b.nodes[-1].input[2]
    b.output(b.bn(y, 4))
    b.output(b.node("Identity", [bias]))  # the computed bias is also read elsewhere
    m = b.model(opset=18)
    res = fuse(m)
    assert len(res.folds) == 1
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Expand") == 2 and "Shape" in ops  # still computes the other output
    assert_close(m, res.model)


@pytest.mark.parametrize("chain", [["Identity"], ["Cast"], ["Identity", "Cast", "Identity"]])
def test_bn_parameters_behind_identity_and_cast(chain: list[str]) -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.conv(x, 3, 4, [3, 3])
    r = np.random.default_rng(5)
    params = []
    for p in (
        r.uniform(0.5, 2, 4),
        r.normal(0, 1, 4),
        r.normal(0, 1, 4),
        r.uniform(0.2, 3, 4),
    ):
        name = b.const(p.astype(np.float16 if "Cast" in chain else np.float32), "p")
        for op in chain:
            name = b.node(op, [name], to=TensorProto.FLOAT) if op == "Cast" else b.node(op, [name])
        params.append(name)
    b.output(b.node("BatchNormalization", [y, *params], name="bn"))
    m = b.model()
    res = fuse(m)
    assert [f.bn for f in res.folds] == ["bn"]
    assert {n.op_type for n in res.model.graph.node} == {"Conv"}
    assert len(res.model.graph.initializer) == 2  # the folded W and b, old params dropped
    assert_close(m, res.model)


def test_computed_conv_weight_folds() -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", ["N", 3, 6, 6])
    w16 = b.const(np.random.default_rng(6).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float16))
    w = b.node("Cast", [w16], to=TensorProto.FLOAT)
    y = b.node("Conv", [x, w])
    b.output(b.bn(y, 4, name="bn"))
    m = b.model()
    res = fuse(m)
    assert [f.bn for f in res.folds] == ["bn"]
    assert [n.op_type for n in res.model.graph.node] == ["Conv"]
    assert_close(m, res.model)


def test_unevaluable_subgraph_refused_naming_the_op() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", ["N", 3, 6, 6])
    noise = b.node("RandomNormal", [], shape=[4], dtype=TensorProto.FLOAT)
    bias = b.node("Identity", [noise])
    y = b.node("Conv", [x, b.weight([4, 3, 3, 3]), bias])
    b.output(b.bn(y, 4, name="bn"))
    res = fuse(b.model(), forward=False)
    assert not res.folds
    (ref,) = res.refusals
    assert "RandomNormal" in ref.reason and "not a constant" in ref.reason


def test_subgraph_reading_a_graph_input_is_refused() -> None:
    b = GraphBuilder(seed=8)
    x = b.input("x", ["N", 3, 6, 6])
    s = b.input("s", [4])
    y = b.conv(x, 3, 4, [3, 3])
    params = [b.node("Identity", [s])] + [b.const(np.ones(4, np.float32)) for _ in range(3)]
    b.output(b.node("BatchNormalization", [y, *params], name="bn"))
    res = fuse(b.model(), forward=False)
    assert not res.folds
    assert "'s', a graph input" in res.refusals[0].reason


def test_shape_of_dynamic_tensor_is_refused_and_static_one_folds() -> None:
    for dims, folds in ((["N", 3, 6, 6], 0), ([2, 3, 6, 6], 1)):
        b = GraphBuilder(seed=9)
        x = b.input("x", dims)
        y = b.conv(x, 3, 4, [3, 3], bias=False)
        # a mean computed from the input's shape: Gather(Shape(x), 0) cast to float / 10
        n = b.node("Cast", [b.node("Gather", [b.node("Shape", [x]), b.const(np.array(0))])], to=1)
        mean = b.node(
            "Expand", [b.node("Div", [n, b.const(np.float32(10))]), b.const(np.array([4]))]
        )
        params = [b.const(p) for p in (np.full(4, 1.5, np.float32), np.ones(4, np.float32))]
        var = b.const(np.full(4, 2.0, np.float32))
        b.output(b.node("BatchNormalization", [y, *params, mean, var], name="bn"))
        m = b.model()
        res = fuse(m, forward=False)
        assert len(res.folds) == folds
        if folds:
            assert_close(m, res.model, seed=2)
        else:
            assert "'x', whose shape is not static" in res.refusals[0].reason


def test_oversized_expand_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfuse.onnx import constants

    monkeypatch.setattr(constants, "MAX_ELEMENTS", 3)
    m = dynamo_model(blocks=1)
    res = fuse(m)
    assert not res.folds
    assert "Expand would give 4 elements, over 3" in res.refusals[0].reason


def test_external_data_model_with_computed_bias(tmp_path: Path) -> None:
    from bnfuse.api import fuse as api_fuse

    b = GraphBuilder(seed=11)
    y = b.input("x", ["N", 16, 8, 8])
    y = b.bn(dynamo_conv(b, y, 16, 32), 32)
    b.output(b.bn(dynamo_conv(b, y, 32, 32), 32))
    m = b.model(opset=18)
    src = tmp_path / "m.onnx"
    stored = onnx.ModelProto()
    stored.CopyFrom(m)  # saving with external data rewrites the model it is given
    onnx.save_model(stored, src, save_as_external_data=True, location="m.data", size_threshold=256)
    out = tmp_path / "out.onnx"
    res = api_fuse(src, out)
    assert len(res.folds) == 2 and not res.refusals
    fused = onnx.load(out)  # loads its external data
    assert count_ops(fused, "BatchNormalization") == 0 and count_ops(fused, "Expand") == 0
    assert_close(m, fused)


def test_shape_start_end_semantics() -> None:
    from bnfuse.onnx.constants import _shape_value

    node = helper.make_node("Shape", ["a"], ["b"], start=-3, end=-1)
    assert _shape_value(node, (2, 3, 4, 5)).tolist() == [3, 4]
    node = helper.make_node("Shape", ["a"], ["b"], start=-9, end=99)
    assert _shape_value(node, (2, 3)).tolist() == [2, 3]


def test_external_data_model_with_large_computed_weight_and_bias(tmp_path: Path) -> None:
    """A computed weight (Cast of a float16 initializer) and a computed bias both over the
    inline limit: the new initializers are written to the output's external data file."""
    from bnfuse.api import fuse as api_fuse

    b = GraphBuilder(seed=12)
    x = b.input("x", ["N", 32, 6, 6])
    w16 = b.const(np.random.default_rng(12).normal(0, 0.2, (300, 32, 3, 3)).astype(np.float16))
    w = b.node("Cast", [w16], to=TensorProto.FLOAT)
    bias = b.node("Expand", [b.const(np.array([0.25], np.float32)), b.const(np.array([300]))])
    b.output(b.bn(b.node("Conv", [x, w, bias]), 300, name="bn"))
    m = b.model()
    src = tmp_path / "m.onnx"
    stored = onnx.ModelProto()
    stored.CopyFrom(m)
    onnx.save_model(stored, src, save_as_external_data=True, location="m.data", size_threshold=256)
    out = tmp_path / "out.onnx"
    res = api_fuse(src, out)
    assert [f.bn for f in res.folds] == ["bn"] and not res.refusals
    raw = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in raw.graph.node] == ["Conv"]
    external = {t.name for t in raw.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert set(raw.graph.node[0].input[1:]) <= external  # both new tensors live outside
    fused = onnx.load(out)
    assert_close(m, fused)


def test_overridable_initializer_leaf_needs_the_flag() -> None:
    b = GraphBuilder(seed=13)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.conv(x, 3, 4, [3, 3])
    mean = b.const(np.full(4, 0.5, np.float32), "mean")
    b.inputs.append(helper.make_tensor_value_info(mean, TensorProto.FLOAT, [4]))
    params = [b.const(np.full(4, v, np.float32)) for v in (1.5, 0.1)]
    var = b.const(np.full(4, 2.0, np.float32))
    b.output(b.node("BatchNormalization", [y, *params, b.node("Identity", [mean]), var], name="bn"))
    m = b.model()
    res = fuse(m, forward=False)
    assert not res.folds and "overridable" in res.refusals[0].reason
    res = fuse(m, forward=False, treat_initializer_inputs_as_constants=True)
    assert [f.bn for f in res.folds] == ["bn"]


def test_finding_layers_never_evaluates_their_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a computed weight makes a node a layer is decided from the graph's structure:
    a refused fold next to a Cast weight evaluates nothing (a large model's weights stay
    unread and uncopied)."""
    from bnfuse.onnx import constants

    calls: list[str] = []
    real = constants._run_node
    monkeypatch.setattr(
        constants, "_run_node", lambda g, n, f: calls.append(n.op_type) or real(g, n, f)
    )
    b = GraphBuilder(seed=14)
    x = b.input("x", ["N", 3, 6, 6])
    w16 = b.const(np.random.default_rng(14).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float16))
    y = b.node("Conv", [x, b.node("Cast", [w16], to=TensorProto.FLOAT)])
    b.output(y)  # the Conv output is also a graph output: the fold is refused first
    b.output(b.node("Mul", [y, b.const(np.full((1, 4, 1, 1), 2.0, np.float32))], name="mul"))
    res = fuse(b.model(), forward=False)
    assert [r.bn for r in res.refusals] == ["mul"] and "graph output" in res.refusals[0].reason
    assert calls == []
