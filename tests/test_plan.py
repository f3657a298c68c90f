"""The planning core (bnfuse/plan.py): layouts, plans and refusals, backend-neutral.

Every layout of the module's table is checked against a brute-force definition of its
channels, and the folds it plans against the layer computed directly in numpy (grouped
1x1 convolutions: a per-group matrix product, in each weight layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfuse.fold import Affine, gemm_bias_backward, gemm_bias_forward
from bnfuse.plan import (
    BackwardPlan,
    ForwardPlan,
    Layout,
    flatten_affine,
    fold_record,
    plan_backward,
    plan_forward,
)
from bnfuse.reasons import PADDING, TRANSPOSE_SHIFT, Reason, code_for

PLAN = Path(__file__).resolve().parents[1] / "bnfuse" / "plan.py"


def affine(n: int, seed: int = 0, shift: bool = True) -> Affine:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, n)
    return Affine(scale, rng.normal(size=n) if shift else np.zeros(n))


def full(cmap: np.ndarray, layout: Layout, view: tuple[int, ...] | None) -> np.ndarray:
    """A channel map as large as the weight (maps broadcast to the weight or its view)."""
    target = view if view is not None else layout.shape
    return np.broadcast_to(cmap, target).reshape(layout.shape)


# -- layouts: channel maps against brute force ------------------------------------------


@given(g=st.integers(1, 4), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), k=st.integers(1, 2))
@settings(max_examples=40, deadline=None)
def test_grouped_maps_match_brute_force(g: int, cin_g: int, cout_g: int, k: int) -> None:
    """ONNX Conv, ONNX ConvTranspose and Keras ConvND, grouped: every element's input and
    output channel, from the maps, equals the one its indices define."""
    cases = {
        # ONNX Conv W[o, j, kh]: out o, in (o // cout_g) * cin_g + j
        "onnx-conv": (
            Layout((g * cout_g, cin_g, k), (0,), (1,), groups=g),
            lambda o, j, _: (o, (o // cout_g) * cin_g + j),
        ),
        # ONNX ConvTranspose W[i, j, kh]: in i, out (i // cin_g) * cout_g + j
        "onnx-conv-transpose": (
            Layout((g * cin_g, cout_g, k), (1,), (0,), groups=g, transposed=True),
            lambda i, j, _: ((i // cin_g) * cout_g + j, i),
        ),
        # Keras ConvND kernel (kh, j, o): out o, in (o // cout_g) * cin_g + j
        "keras-conv": (
            Layout((k, cin_g, g * cout_g), (-1,), (-2,), groups=g),
            lambda _, j, o: (o, (o // cout_g) * cin_g + j),
        ),
    }
    for name, (layout, expect) in cases.items():
        assert layout.in_channels == g * cin_g, name
        assert layout.out_channels == g * cout_g, name
        out_map, in_map, view = layout.maps(need_in=True)
        assert in_map is not None
        outs, ins = full(out_map, layout, view), full(in_map, layout, view)
        for idx in np.ndindex(*layout.shape):
            assert (outs[idx], ins[idx]) == expect(*idx), (name, idx)
        back_map, _, back_view = layout.maps(need_in=False)
        assert np.array_equal(full(back_map, layout, back_view), outs), name


def test_keras_depthwise_and_transpose_layouts() -> None:
    """Keras DepthwiseConv (k, in, mult): output channel i*mult + m; Keras ConvTranspose
    (k, out, in): output axis -2, input axis -1."""
    dw = Layout((3, 4, 2), (-2, -1), (-2,))
    out_map, in_map, view = dw.maps(need_in=True)
    assert view is None and in_map is not None
    assert dw.out_channels == 8 and dw.in_channels == 4
    for kh, i, m in np.ndindex(3, 4, 2):
        assert full(out_map, dw, None)[kh, i, m] == i * 2 + m
        assert full(in_map, dw, None)[kh, i, m] == i
    tr = Layout((3, 5, 4), (-2,), (-1,), transposed=True)
    out_map, in_map, _ = tr.maps(need_in=True)
    assert in_map is not None
    assert (tr.out_channels, tr.in_channels) == (5, 4)
    assert full(out_map, tr, None)[1, 3, 2] == 3 and full(in_map, tr, None)[1, 3, 2] == 2


# -- plans: folds against the layer computed directly -------------------------------------


def grouped_1x1(x: np.ndarray, wmat: list[np.ndarray], b: np.ndarray) -> np.ndarray:
    """y[:, group gi] = x[:, group gi] @ wmat[gi] + b: a grouped 1x1 convolution."""
    g = len(wmat)
    xs = np.split(x, g, axis=1)
    return np.concatenate([xi @ wi for xi, wi in zip(xs, wmat, strict=True)], axis=1) + b


def as_layouts(wmat: list[np.ndarray]) -> dict[str, tuple[Layout, np.ndarray]]:
    """The same grouped 1x1 layer (per-group matrices [cin_g, cout_g]) in each layout."""
    g = len(wmat)
    onnx_conv = np.concatenate([w.T for w in wmat], axis=0)[:, :, None]  # [C_out, cin_g, 1]
    onnx_tr = np.concatenate(wmat, axis=0)[:, :, None]  # [C_in, cout_g, 1]
    keras_conv = np.concatenate(wmat, axis=1)[None]  # (1, cin_g, C_out)
    return {
        "onnx-conv": (Layout(onnx_conv.shape, (0,), (1,), groups=g), onnx_conv),
        "onnx-conv-transpose": (
            Layout(onnx_tr.shape, (1,), (0,), groups=g, transposed=True),
            onnx_tr,
        ),
        "keras-conv": (Layout(keras_conv.shape, (-1,), (-2,), groups=g), keras_conv),
    }


def back_to_groups(name: str, w: np.ndarray, g: int) -> list[np.ndarray]:
    if name == "onnx-conv":
        return [m.T for m in np.split(w[:, :, 0], g, axis=0)]
    if name == "onnx-conv-transpose":
        return np.split(w[:, :, 0], g, axis=0)
    return np.split(w[0], g, axis=1)


@given(
    g=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), seed=st.integers(0, 99)
)
@settings(max_examples=30, deadline=None)
def test_planned_folds_equal_the_layer(g: int, cin_g: int, cout_g: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    wmat = [rng.normal(size=(cin_g, cout_g)) for _ in range(g)]
    b = rng.normal(size=g * cout_g)
    x = rng.normal(size=(5, g * cin_g))
    after, before = affine(g * cout_g, seed), affine(g * cin_g, seed + 1)
    for name, (layout, w) in as_layouts(wmat).items():
        y = grouped_1x1(x, wmat, b)
        bp = plan_backward(layout, after, layer=name)
        assert isinstance(bp, BackwardPlan), bp
        w2, b2 = bp.fold(w, b)
        got = grouped_1x1(x, back_to_groups(name, np.asarray(w2), g), b2)
        np.testing.assert_allclose(got, after.scale * y + after.shift, rtol=1e-10, atol=1e-10)
        if layout.transposed:  # a 1x1 stride-1 transpose has no borders; the rule refuses
            assert plan_forward(layout, before, layer=name) == TRANSPOSE_SHIFT
            before_scale = Affine(before.scale, np.zeros_like(before.shift))
        else:
            before_scale = before
        fp = plan_forward(layout, before_scale, layer=name)
        assert isinstance(fp, ForwardPlan), fp
        w3, b3 = fp.fold(w, b)
        got = grouped_1x1(x, back_to_groups(name, np.asarray(w3), g), b3)
        want = grouped_1x1(x * before_scale.scale + before_scale.shift, wmat, b)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_scalar_affine_widens_and_counts_must_match() -> None:
    layout = Layout((6, 2, 3, 3), (0,), (1,), groups=2)
    one = Affine(np.array([2.0]), np.array([0.5]))
    plan = plan_backward(layout, one, layer="Conv")
    assert isinstance(plan, BackwardPlan)
    assert np.array_equal(plan.affine.scale, np.full(6, 2.0))
    refused = plan_backward(layout, affine(5), layer="Conv", norm="Mul")
    assert refused == "Mul has 5 channels but Conv output has 6"
    assert (
        plan_forward(layout, affine(3), layer="Conv")
        == "BatchNormalization has 3 channels but Conv input has 4"
    )
    dense = Layout((4, 7), (1,), (0,), dense=True)
    assert plan_forward(dense, affine(5), layer="Gemm") == (
        "BatchNormalization gives 5 features but Gemm takes 4"
    )
    flat_one = Affine(np.array([1.0]), np.array([0.0]))  # a flatten of one feature
    assert isinstance(plan_forward(dense, flat_one, layer="Gemm"), ForwardPlan)
    assert isinstance(plan_forward(dense, flat_one, layer="Gemm", per_feature=True), str)


def test_forward_exactness() -> None:
    padded = Layout((4, 4, 3, 3), (0,), (1,), pads_input=True)
    assert plan_forward(padded, affine(4), layer="Conv") == PADDING
    ok = plan_forward(padded, affine(4, shift=False), layer="Conv")
    assert isinstance(ok, ForwardPlan) and ok.shift_zero
    unpadded = plan_forward(Layout((4, 4, 3, 3), (0,), (1,)), affine(4), layer="Conv")
    assert isinstance(unpadded, ForwardPlan) and not unpadded.shift_zero


def test_group_refusals() -> None:
    tr = Layout((4, 2, 3, 3), (1,), (0,), groups=3, transposed=True)
    assert plan_backward(tr, affine(6), layer="ConvTranspose") == (
        "ConvTranspose weight has 4 input channels, not divisible by group=3"
    )
    conv = Layout((4, 2, 3, 3), (0,), (1,), groups=3)
    assert plan_forward(conv, affine(6), layer="Conv") == (
        "Conv weight of shape [4, 2, 3, 3]: its output channels do not divide into group=3"
    )
    flat = Layout((4,), (0,), (1,))  # a 1-D Conv weight: no input channel axis
    assert "do not divide into group=1" in str(plan_forward(flat, affine(4), layer="Conv"))


def test_every_core_refusal_carries_its_code() -> None:
    """The core tags each refusal where it makes it, with the code of what it says (one
    reason, one code, however it was made); nothing reads the sentence afterwards."""
    dense = Layout((4, 7), (1,), (0,), dense=True)
    made = [
        (
            plan_backward(
                Layout((4, 2, 3), (1,), (0,), groups=3, transposed=True), affine(6), layer="T"
            ),
            "unsupported-layer",
        ),
        (plan_backward(dense, affine(5), layer="Gemm"), "axis-mismatch"),
        (
            plan_forward(Layout((4, 2, 3), (0,), (1,), groups=3), affine(6), layer="Conv"),
            "unsupported-layer",
        ),
        (plan_forward(dense, affine(5), layer="MatMul"), "axis-mismatch"),
        (plan_forward(Layout((4, 4, 3), (0,), (1,)), affine(3), layer="Conv"), "axis-mismatch"),
        (
            plan_forward(Layout((4, 4, 3), (1,), (0,), transposed=True), affine(4), layer="T"),
            "padding",
        ),
        (
            plan_forward(Layout((4, 4, 3), (0,), (1,), pads_input=True), affine(4), layer="Conv"),
            "padding",
        ),
        (flatten_affine(affine(3), (3, 2), axis=1, elem_shape=(2, 3, 2)), "axis-mismatch"),
        (flatten_affine(affine(3), (3, 2), axis=0), "axis-mismatch"),
        (flatten_affine(affine(4), (3, 2), axis=1), "axis-mismatch"),
        (flatten_affine(affine(6), (3, 2), axis=None, elem_shape=(1, 6)), "axis-mismatch"),
    ]
    assert all(isinstance(r, Reason) for r, _ in made), made
    assert [(str(r), code_for(r)) for r, _ in made] == [(str(r), code) for r, code in made]
    assert made[5][0] == TRANSPOSE_SHIFT and made[6][0] == PADDING


def test_flatten_expansion_orders_features_row_major_or_permuted() -> None:
    aff = Affine(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0]))
    # NCHW input (C=3, H=1, W=2): ONNX Flatten walks c, h, w
    flat = flatten_affine(aff, (3, 1, 2), axis=1)
    assert isinstance(flat, Affine)
    assert flat.scale.tolist() == [1, 1, 2, 2, 3, 3]
    # Keras channels_first Flatten moves the channels last first: h, w, c
    perm = flatten_affine(aff, (3, 1, 2), axis=1, perm=(1, 2, 0))
    assert isinstance(perm, Affine)
    assert perm.shift.tolist() == [10, 20, 30, 10, 20, 30]
    # channels_last (H=2, C=3), the channel on the last axis
    last = flatten_affine(aff, (2, 3), axis=2)
    assert isinstance(last, Affine) and last.scale.tolist() == [1, 2, 3, 1, 2, 3]
    scalar = flatten_affine(Affine(np.array([2.0]), np.array([1.0])), (2, 2), axis=None)
    assert isinstance(scalar, Affine) and scalar.scale.tolist() == [2.0] * 4
    elem = flatten_affine(affine(4), (2, 2), axis=None, elem_shape=(1, 2, 2))
    assert isinstance(elem, Affine) and np.array_equal(elem.scale, affine(4).scale)
    assert flatten_affine(aff, (3, 2), axis=3) == (
        "BatchNormalization normalizes axis 3 of a rank-3 tensor (the batch axis)"
    )


def test_fold_record_names_each_layer_and_rule_once() -> None:
    rec = fold_record(
        "bn", "forward", ["a", "b", "a"], ["bn-conv", "bn-conv"], channels=4,
        details=["", "x", "x"], scope="s",
    )  # fmt: skip
    assert (rec.into, rec.rule, rec.detail, rec.scope) == ("a, b", "bn-conv", "x", "s")
    assert (rec.bn, rec.direction, rec.channels, rec.kind) == (
        "bn",
        "forward",
        4,
        "BatchNormalization",
    )


def test_gemm_alpha_beta() -> None:
    """Gemm's alpha/beta conversions against Y = alpha*A@B + beta*C computed directly."""
    rng = np.random.default_rng(3)
    a, b, c = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=(1, 3))
    alpha, beta = 0.7, 1.9
    aff = affine(3, 4)
    y = alpha * a @ b + beta * c
    c2 = gemm_bias_backward(c, beta, aff)
    assert c2.shape == (1, 3)  # C keeps its shape
    np.testing.assert_allclose(alpha * a @ (b * aff.scale) + c2, aff.scale * y + aff.shift)
    np.testing.assert_allclose(gemm_bias_backward(None, beta, aff), aff.shift)
    before = affine(4, 5)
    tw = before.shift @ b
    c3 = gemm_bias_forward(c, alpha, beta, tw)
    assert c3 is not None
    want = alpha * (a * before.scale + before.shift) @ b + beta * c
    np.testing.assert_allclose(alpha * a @ (b * before.scale[:, None]) + c3, want)
    assert gemm_bias_forward(None, alpha, beta, np.zeros(3)) is None
    c4 = gemm_bias_forward(None, alpha, beta, tw)
    assert c4 is not None
    np.testing.assert_allclose(c4, alpha * tw)


def test_the_core_imports_no_framework() -> None:
    """plan.py is backend-neutral: numpy, the standard library and bnfuse's own
    framework-free modules only (no onnx, no keras, no backend module)."""
    allowed = {"__future__", "math", "collections.abc", "dataclasses", "typing", "numpy",
               "numpy.typing", "bnfuse", "bnfuse.fold", "bnfuse.reasons", "bnfuse.result"}  # fmt: skip
    tree = ast.parse(PLAN.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    assert found <= allowed, found - allowed
    assert "numpy" in found


@pytest.mark.parametrize("groups", [1, 2])
def test_lazy_fold_matches_eager(groups: int) -> None:
    """A plan folds the same with lazy weights (bnfuse.fold.Scaled) as eagerly."""
    layout = Layout((4, 2, 3, 3), (1,), (0,), groups=groups, transposed=True)
    w = np.random.default_rng(0).normal(size=layout.shape).astype(np.float32)
    plan = plan_backward(layout, affine(layout.out_channels), layer="ConvTranspose")
    assert isinstance(plan, BackwardPlan)
    lazy_w, lazy_b = plan.fold(w, None, weight_dtype=w.dtype, bias_dtype=np.float32, lazy=True)
    eager_w, eager_b = plan.fold(w, None, weight_dtype=w.dtype)
    assert np.array_equal(np.asarray(lazy_w), eager_w)
    assert lazy_b.dtype == np.float32 and np.array_equal(lazy_b, eager_b.astype(np.float32))
