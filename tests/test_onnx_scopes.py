"""Folds inside subgraphs (If branches, Loop and Scan bodies, nested) and model-local
functions, with weights from the enclosing scope or Constant nodes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_util import bn_params, ort_run

from bnfuse.backend import FuseOptions
from bnfuse.onnx.backend import OnnxBackend

F = TensorProto.FLOAT
C = 4


def fuse(model: onnx.ModelProto, **opts: object):
    before = model.SerializeToString()
    res = OnnxBackend().fuse(model, FuseOptions(**opts))  # type: ignore[arg-type]
    assert model.SerializeToString() == before, "input model was mutated"
    onnx.checker.check_model(res.model, full_check=True)
    return res


def t(arr: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


class Weights:
    """Randomized Conv weights and BN statistics, as initializers or Constant nodes."""

    def __init__(self, seed: int, prefix: str) -> None:
        r = np.random.default_rng(seed)
        self.p = prefix
        self.arrays = {
            f"{prefix}W": r.normal(0, 0.5, (C, C, 3, 3)),
            f"{prefix}B": r.normal(0, 1, C),
        }
        for n, a in zip(("g", "b", "m", "v"), bn_params(C, r), strict=True):
            self.arrays[f"{prefix}{n}"] = a
        self.arrays[f"{prefix}s"] = r.uniform(0.5, 2, (C, 1, 1))

    def inits(self) -> list[onnx.TensorProto]:
        return [t(a, n) for n, a in self.arrays.items()]

    def constants(self) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Constant", [], [n], name=f"const_{n}", value=t(a, n))
            for n, a in self.arrays.items()
        ]

    def conv_bn(self, x: str, out: str, tag: str) -> list[onnx.NodeProto]:
        """Conv(pads 1) -> BN -> Mul(per-channel constant) -> Relu, same shape as x."""
        p = self.p
        return [
            helper.make_node(
                "Conv", [x, f"{p}W", f"{p}B"], [f"{tag}_c"], name=f"{tag}_conv", pads=[1] * 4
            ),
            helper.make_node(
                "BatchNormalization",
                [f"{tag}_c", f"{p}g", f"{p}b", f"{p}m", f"{p}v"],
                [f"{tag}_bn"],
                name=f"{tag}_bn",
            ),
            helper.make_node("Mul", [f"{tag}_bn", f"{p}s"], [f"{tag}_mul"], name=f"{tag}_mul"),
            helper.make_node("Relu", [f"{tag}_mul"], [out], name=f"{tag}_relu"),
        ]


def image(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, shape or ["N", C, 5, 5])


def model(graph: onnx.GraphProto, **kw: object) -> onnx.ModelProto:
    kw.setdefault("opset_imports", [helper.make_opsetid("", 17)])
    m = helper.make_model(graph, **kw)  # type: ignore[arg-type]
    m.ir_version = 8
    return m


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_run(m, feeds)


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


def no_norms(g: onnx.GraphProto) -> None:
    for n in g.node:
        assert n.op_type not in ("BatchNormalization", "Mul"), n.name
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                no_norms(a.g)


X = np.random.default_rng(0).normal(size=(2, C, 5, 5)).astype(np.float32)


def if_model(shared_outer_conv: bool = False) -> onnx.ModelProto:
    outer = Weights(1, "o_")
    then_w, else_w = Weights(2, "t_"), Weights(3, "e_")
    then_g = helper.make_graph(then_w.conv_bn("x", "y_then", "then"), "then", [], [image("y_then")])
    else_g = helper.make_graph(else_w.conv_bn("x", "y_else", "else"), "else", [], [image("y_else")])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if1", then_branch=then_g, else_branch=else_g)
    ]
    outputs = [image("y")]
    if shared_outer_conv:  # the outer graph uses the then-branch's weights too
        nodes += then_w.conv_bn("x", "z", "outer")
        outputs.append(image("z"))
    g = helper.make_graph(
        nodes,
        "main",
        [image("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        outputs,
        outer.inits() + then_w.inits() + else_w.inits(),
    )
    return model(g)


@pytest.mark.parametrize("shared", [False, True])
def test_if_branches_with_outer_scope_weights(shared: bool) -> None:
    m = if_model(shared)
    res = fuse(m)
    assert not res.refusals, res.refusals
    scopes = sorted({f.scope for f in res.folds})
    assert scopes == (
        ["", "If:else_branch of node if1", "If:then_branch of node if1"]
        if shared
        else ["If:else_branch of node if1", "If:then_branch of node if1"]
    )
    assert len(res.folds) == (6 if shared else 4)
    no_norms(res.model.graph)
    for cond in (True, False):
        assert_same(m, res.model, {"x": X, "cond": np.array(cond)})
    # outer weights no longer read by anyone are gone; the weights of the outer Conv stay
    names = {i.name for i in res.model.graph.initializer}
    assert not any(n.startswith("e_") for n in names)
    if shared:
        assert "t_W" in names


def test_loop_body() -> None:
    w = Weights(4, "l_")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="id"),
            *w.conv_bn("y_in", "y_out", "body"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            image("y_in"),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), image("y_out")],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop1", body=body)],
        "main",
        [image("x")],
        [image("y")],
        [*w.inits(), numpy_helper.from_array(np.array(3, np.int64), "trips")],
    )
    m = model(g)
    res = fuse(m)
    assert not res.refusals, res.refusals
    assert {f.scope for f in res.folds} == {"Loop:body of node loop1"}
    assert sorted(f.kind for f in res.folds) == ["BatchNormalization", "Mul"]
    no_norms(res.model.graph)
    assert_same(m, res.model, {"x": X})


def test_scan_body() -> None:
    w = Weights(5, "s_")
    body = helper.make_graph(
        w.conv_bn("frame", "out", "step"),
        "body",
        [image("frame")],
        [image("out")],
    )
    g = helper.make_graph(
        [helper.make_node("Scan", ["seq"], ["outs"], name="scan1", body=body, num_scan_inputs=1)],
        "main",
        [helper.make_tensor_value_info("seq", F, [3, 2, C, 5, 5])],
        [helper.make_tensor_value_info("outs", F, [3, 2, C, 5, 5])],
        w.inits(),
    )
    m = model(g)
    res = fuse(m)
    assert not res.refusals, res.refusals
    assert {f.scope for f in res.folds} == {"Scan:body of node scan1"}
    no_norms(res.model.graph)
    seq = np.random.default_rng(1).normal(size=(3, 2, C, 5, 5)).astype(np.float32)
    assert_same(m, res.model, {"seq": seq})


def test_nested_if_inside_loop_with_constants_two_levels_up() -> None:
    w = Weights(6, "n_")
    then_g = helper.make_graph(w.conv_bn("y_in", "a", "inner"), "then", [], [image("a")])
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["y_in"], ["b"], name="pass")], "else", [], [image("b")]
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="id"),
            helper.make_node(
                "If", ["flag"], ["y_out"], name="if2", then_branch=then_g, else_branch=else_g
            ),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            image("y_in"),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), image("y_out")],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop2", body=body)],
        "main",
        [image("x"), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [image("y")],
        [*w.inits(), numpy_helper.from_array(np.array(2, np.int64), "trips")],
    )
    m = model(g)
    res = fuse(m)
    assert not res.refusals, res.refusals
    assert {f.scope for f in res.folds} == {"Loop:body of node loop2 / If:then_branch of node if2"}
    no_norms(res.model.graph)
    for flag in (True, False):
        assert_same(m, res.model, {"x": X, "flag": np.array(flag)})


def test_subgraph_outer_initializer_listed_as_input() -> None:
    m = if_model()
    m.ir_version = 4
    for name in ("t_W", "e_g"):
        m.graph.input.append(
            helper.make_tensor_value_info(
                name, F, list(Weights(0, "").arrays["W" if name.endswith("W") else "g"].shape)
            )
        )
    res = fuse(m)
    reasons = {r.bn: r.reason for r in res.refusals}
    assert set(reasons) == {"then_bn", "else_bn", "then_mul", "else_mul"}
    for bn in ("then_bn", "else_bn"):
        assert "--treat-initializer-inputs-as-constants" in reasons[bn]
    for mul in ("then_mul", "else_mul"):  # next to a layer only through the BN left in place
        assert "produced by BatchNormalization" in reasons[mul]
    assert all(r.scope.startswith("If:") for r in res.refusals)
    res2 = fuse(m, treat_initializer_inputs_as_constants=True)
    assert not res2.refusals
    assert len(res2.folds) == 4


def function_model() -> onnx.ModelProto:
    w = Weights(7, "f_")
    fn = helper.make_function(
        "my.domain",
        "ConvBnRelu",
        ["fx"],
        ["fy"],
        [*w.constants(), *w.conv_bn("fx", "fy", "fn")],
        [helper.make_opsetid("", 17)],
    )
    g = helper.make_graph(
        [
            helper.make_node("ConvBnRelu", ["x"], ["h"], name="call1", domain="my.domain"),
            helper.make_node("ConvBnRelu", ["h"], ["y"], name="call2", domain="my.domain"),
        ],
        "main",
        [image("x")],
        [image("y")],
    )
    return model(
        g,
        functions=[fn],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)],
    )


def test_function_body_with_constant_weights() -> None:
    m = function_model()
    res = fuse(m)
    assert not res.refusals, res.refusals
    assert {f.scope for f in res.folds} == {"function my.domain.ConvBnRelu"}
    assert sorted(f.kind for f in res.folds) == ["BatchNormalization", "Mul"]
    body = res.model.functions[0].node
    assert [n.op_type for n in body if n.op_type != "Constant"] == ["Conv", "Relu"]
    assert sum(n.op_type == "Constant" for n in body) == 2  # W and B, rewritten in place
    assert not res.model.graph.initializer
    assert_same(m, res.model, {"x": X})


def test_function_input_weight_refused() -> None:
    r = np.random.default_rng(8)
    params = [t(a, f"p{i}") for i, a in enumerate(bn_params(C, r))]
    fn = helper.make_function(
        "my.domain",
        "ConvBn",
        ["fx", "fw"],
        ["fy"],
        [
            *(helper.make_node("Constant", [], [p.name], value=p) for p in params),
            helper.make_node("Conv", ["fx", "fw"], ["c"], name="conv", pads=[1] * 4),
            helper.make_node(
                "BatchNormalization", ["c", *(p.name for p in params)], ["fy"], name="bn"
            ),
        ],
        [helper.make_opsetid("", 17)],
    )
    g = helper.make_graph(
        [helper.make_node("ConvBn", ["x", "w"], ["y"], name="call", domain="my.domain")],
        "main",
        [image("x")],
        [image("y")],
        [t(r.normal(size=(C, C, 3, 3)), "w")],
    )
    m = model(
        g,
        functions=[fn],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)],
    )
    res = fuse(m)
    assert not res.folds
    assert len(res.refusals) == 1
    assert res.refusals[0].scope == "function my.domain.ConvBn"
    assert "'fw' is a function input, not a constant" in res.refusals[0].reason
    assert res.model.functions[0] == m.functions[0]


def test_count_affine_nodes_sees_subgraphs_and_functions() -> None:
    from bnfuse.onnx.count import count_affine_nodes

    assert count_affine_nodes(if_model()) == {"BatchNormalization": 2, "affine": 2}
    assert count_affine_nodes(function_model()) == {"BatchNormalization": 1, "affine": 1}
    res = fuse(if_model())
    assert count_affine_nodes(res.model) == {"BatchNormalization": 0, "affine": 0}


@pytest.mark.parametrize("build", [lambda: if_model(True), function_model])
def test_in_place_fold_equals_the_copying_fold(build: Callable[[], onnx.ModelProto]) -> None:
    # FuseOptions(in_place=True) (a model loaded from a path, nothing needs the original)
    # rewrites the given object; the result must equal the copying fold's
    copied = fuse(build())
    target = build()
    res = OnnxBackend().fuse(target, FuseOptions(in_place=True))
    assert res.model is target
    assert [f.bn for f in res.folds] == [f.bn for f in copied.folds] and res.folds
    assert res.model.SerializeToString() == copied.model.SerializeToString()
