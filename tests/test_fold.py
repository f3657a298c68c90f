"""Property tests of :mod:`bnfuse.fold` against direct numpy evaluation.

Every linear layer below is written out independently of ``channel_map`` (explicit loops
over kernel offsets and groups), BatchNormalization is the textbook formula in float64,
and the folded layer must reproduce "layer, then BN" (or "BN, then layer").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bnfuse.fold import (
    Affine,
    bn_affine,
    channel_map,
    check_affine,
    check_bn,
    fold_backward,
    fold_forward,
    round_to,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), BF16]

FAST = settings(max_examples=100, deadline=None)
MEDIUM = settings(max_examples=200, deadline=None)

seeds = st.integers(0, 2**32 - 1)
epsilons = st.sampled_from([1e-5, 1e-3, 1e-1, 0.0, 1e-12])


# ------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------


def bn_ref(
    y: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    axis: int,
) -> np.ndarray:
    """gamma * (y - mean) / sqrt(var + eps) + beta along ``axis``, in float64."""
    shape = [1] * y.ndim
    shape[axis] = -1

    def b(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, dtype=np.float64).reshape(shape)

    g = b(np.ones_like(mean)) if gamma is None else b(gamma)
    bt = b(np.zeros_like(mean)) if beta is None else b(beta)
    return g * (y - b(mean)) / np.sqrt(b(var) + eps) + bt


def dense_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """x @ W + b with W[in, out]."""
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    return y if b is None else y + np.asarray(b, np.float64)


def conv_ref(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, groups: int, pads: int = 0
) -> np.ndarray:
    """Grouped N-D convolution (cross-correlation), stride 1, symmetric zero padding.

    x [N, C_in, *S], W [C_out, C_in/g, *k]; output channel o reads input group o // (C_out/g).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    nd = w.ndim - 2
    if pads:
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads, pads)] * nd)
    n = x.shape[0]
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    cout_g = cout // groups
    s_out = [s - kk + 1 for s, kk in zip(x.shape[2:], k, strict=True)]
    y = np.zeros((n, cout, *s_out))
    for gi in range(groups):
        xg = x[:, gi * cin_g : (gi + 1) * cin_g]
        wg = w[gi * cout_g : (gi + 1) * cout_g]
        for off in np.ndindex(*k):
            win = tuple(slice(o, o + so) for o, so in zip(off, s_out, strict=True))
            patch = xg[(slice(None), slice(None), *win)]  # [N, cin_g, *S_out]
            tap = wg[(slice(None), slice(None), *off)]  # [cout_g, cin_g]
            y[:, gi * cout_g : (gi + 1) * cout_g] += np.einsum("nc...,oc->no...", patch, tap)
    if b is not None:
        y += np.asarray(b, np.float64).reshape(1, -1, *([1] * nd))
    return y


def conv_transpose_ref(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, groups: int
) -> np.ndarray:
    """Grouped N-D transposed convolution, stride 1, no padding.

    x [N, C_in, *S], W [C_in, C_out/g, *k]; input channel gi*(C_in/g)+i scatters into
    output channels gi*(C_out/g) + j.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, cin = x.shape[:2]
    cout_g = w.shape[1]
    k = w.shape[2:]
    cin_g = cin // groups
    s_out = [s + kk - 1 for s, kk in zip(x.shape[2:], k, strict=True)]
    y = np.zeros((n, cout_g * groups, *s_out))
    for gi in range(groups):
        xg = x[:, gi * cin_g : (gi + 1) * cin_g]
        wg = w[gi * cin_g : (gi + 1) * cin_g]  # [cin_g, cout_g, *k]
        for off in np.ndindex(*k):
            win = tuple(slice(o, o + s) for o, s in zip(off, x.shape[2:], strict=True))
            tap = wg[(slice(None), slice(None), *off)]  # [cin_g, cout_g]
            y[(slice(None), slice(gi * cout_g, (gi + 1) * cout_g), *win)] += np.einsum(
                "nc...,co->no...", xg, tap
            )
    if b is not None:
        y += np.asarray(b, np.float64).reshape(1, -1, *([1] * len(k)))
    return y


def depthwise_ref(x: np.ndarray, kernel: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Keras DepthwiseConvND, channels last, valid: kernel (*k, C_in, mult).

    Output channel i*mult + m is input channel i convolved with kernel[..., i, m].
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    k = kernel.shape[:-2]
    cin, mult = kernel.shape[-2:]
    n = x.shape[0]
    s_out = [s - kk + 1 for s, kk in zip(x.shape[1:-1], k, strict=True)]
    y = np.zeros((n, *s_out, cin, mult))
    for off in np.ndindex(*k):
        win = tuple(slice(o, o + so) for o, so in zip(off, s_out, strict=True))
        patch = x[(slice(None), *win, slice(None))]  # [N, *S_out, C_in]
        y += patch[..., None] * kernel[off]  # kernel[off]: [C_in, mult]
    y = y.reshape(n, *s_out, cin * mult)
    if b is not None:
        y += np.asarray(b, np.float64)
    return y


# ------------------------------------------------------------------------------------
# Random layers
# ------------------------------------------------------------------------------------


@dataclass
class Layer:
    """A linear layer with its weight, the function evaluating it, and its channel layout."""

    kind: str
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    apply: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]
    out_map: np.ndarray
    axis: int  # channel axis of the output
    channels: int


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    kind = draw(st.sampled_from(["dense", "conv", "conv_transpose", "depthwise"]))
    dtype = draw(st.sampled_from(DTYPES))
    has_bias = draw(st.booleans())
    r = np.random.default_rng(draw(seeds))
    nd = draw(st.integers(1, 2))
    k = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    extra = tuple(draw(st.lists(st.integers(0, 3), min_size=nd, max_size=nd)))
    n = draw(st.integers(1, 2))

    def arr(*shape: int) -> np.ndarray:
        return r.normal(0, 1, shape).astype(dtype)

    if kind == "dense":
        cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        x = r.normal(0, 1, (n, cin))
        w = arr(cin, cout)
        return Layer(
            kind,
            x,
            w,
            arr(cout) if has_bias else None,
            dense_ref,
            channel_map(w.shape, (1,)),
            -1,
            cout,
        )
    if kind == "depthwise":
        cin, mult = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        x = r.normal(0, 1, (n, *(kk + e for kk, e in zip(k, extra, strict=True)), cin))
        w = arr(*k, cin, mult)
        return Layer(
            kind,
            x,
            w,
            arr(cin * mult) if has_bias else None,
            depthwise_ref,
            channel_map(w.shape, (-2, -1)),
            -1,
            cin * mult,
        )
    groups = draw(st.integers(1, 3))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    cin, cout = groups * cin_g, groups * cout_g
    x = r.normal(0, 1, (n, cin, *(kk + e for kk, e in zip(k, extra, strict=True))))
    bias = arr(cout) if has_bias else None
    if kind == "conv":
        w = arr(cout, cin_g, *k)
        return Layer(
            kind,
            x,
            w,
            bias,
            lambda x, w, b: conv_ref(x, w, b, groups),
            channel_map(w.shape, (0,)),
            1,
            cout,
        )
    w = arr(cin, cout_g, *k)
    return Layer(
        kind,
        x,
        w,
        bias,
        lambda x, w, b: conv_transpose_ref(x, w, b, groups),
        channel_map(w.shape, (0, 2), view=(groups, cin_g, cout_g, *k)),
        1,
        cout,
    )


@dataclass
class BN:
    mean: np.ndarray
    var: np.ndarray
    eps: float
    gamma: np.ndarray | None
    beta: np.ndarray | None

    def affine(self) -> Affine:
        return bn_affine(self.mean, self.var, self.eps, self.gamma, self.beta)

    def ref(self, y: np.ndarray, axis: int) -> np.ndarray:
        return bn_ref(y, self.mean, self.var, self.eps, self.gamma, self.beta, axis)


@st.composite
def bns(draw: st.DrawFn, c: int, dtype: Any = np.float64) -> BN:
    r = np.random.default_rng(draw(seeds))
    eps = draw(epsilons)
    gamma = r.uniform(0.2, 3.0, c) * r.choice([-1.0, 1.0], c) if draw(st.booleans()) else None
    beta = r.normal(0, 2, c) if draw(st.booleans()) else None
    var = r.uniform(0.05, 4.0, c)
    if eps >= 1e-3:  # a dead channel (variance 0) is still a finite BN when eps > 0
        var[r.random(c) < 0.2] = 0.0

    def cast(v: np.ndarray | None) -> np.ndarray | None:
        return None if v is None else v.astype(dtype)

    return BN(r.normal(0, 2, c).astype(dtype), var.astype(dtype), eps, cast(gamma), cast(beta))


def magnitude(layer: Layer, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The layer evaluated on |x|, |W|, |b|: bounds the rounding error of each output."""
    return layer.apply(np.abs(layer.x), np.abs(w), np.abs(b))


def assert_close64(actual: np.ndarray, expected: np.ndarray, mag: np.ndarray) -> None:
    """float64 agreement: relative 1e-9 of the magnitude of the terms summed."""
    err = np.abs(actual - expected)
    bound = 1e-9 * (mag + np.abs(expected)) + 1e-300
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


def finfo(dtype: np.dtype[Any]) -> Any:
    return ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)


# ------------------------------------------------------------------------------------
# bn_affine / check_bn
# ------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), c=st.integers(1, 8), seed=seeds)
def test_bn_affine_equals_bn_formula(data: st.DataObject, c: int, seed: int) -> None:
    bn = data.draw(bns(c))
    x = np.random.default_rng(seed).normal(0, 3, (2, c, 3))
    aff = bn.affine()
    assert aff.scale.dtype == np.float64 and aff.shift.dtype == np.float64
    assert aff.channels == c
    got = aff.scale.reshape(1, c, 1) * x + aff.shift.reshape(1, c, 1)
    expected = bn.ref(x, axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.max(np.abs(expected)))
    assert check_bn(bn.mean, bn.var, bn.eps, bn.gamma, bn.beta) is None
    assert check_affine(aff) is None


def test_bn_affine_missing_gamma_beta_defaults() -> None:
    mean, var = np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 1.0])
    bare = bn_affine(mean, var, 0.0)
    explicit = bn_affine(mean, var, 0.0, np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(bare.scale, explicit.scale)
    np.testing.assert_array_equal(bare.shift, explicit.shift)
    np.testing.assert_allclose(bare.scale, [0.5, 2.0, 1.0])
    np.testing.assert_allclose(bare.shift, [-0.5, 4.0, -0.5])
    only_beta = bn_affine(mean, var, 0.0, None, np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(only_beta.shift, [0.5, 5.0, 0.5])
    only_gamma = bn_affine(mean, var, 0.0, np.array([2.0, 2.0, -1.0]), None)
    np.testing.assert_allclose(only_gamma.scale, [1.0, 4.0, -1.0])
    np.testing.assert_allclose(only_gamma.shift, [-1.0, 8.0, 0.5])


@pytest.mark.parametrize(
    ("field", "bad", "reason"),
    [
        ("mean", np.nan, "non-finite BN mean (NaN or Inf)"),
        ("mean", np.inf, "non-finite BN mean (NaN or Inf)"),
        ("var", np.nan, "non-finite BN variance (NaN or Inf)"),
        ("var", np.inf, "non-finite BN variance (NaN or Inf)"),
        ("gamma", -np.inf, "non-finite BN gamma (NaN or Inf)"),
        ("gamma", np.nan, "non-finite BN gamma (NaN or Inf)"),
        ("beta", np.inf, "non-finite BN beta (NaN or Inf)"),
        ("beta", np.nan, "non-finite BN beta (NaN or Inf)"),
    ],
)
def test_check_bn_non_finite_statistics(field: str, bad: float, reason: str) -> None:
    r = np.random.default_rng(0)
    stats = {
        "mean": r.normal(0, 1, 5),
        "var": r.uniform(0.5, 2, 5),
        "gamma": r.normal(0, 1, 5),
        "beta": r.normal(0, 1, 5),
    }
    stats[field][3] = bad
    assert check_bn(stats["mean"], stats["var"], 1e-5, stats["gamma"], stats["beta"]) == reason


def test_check_bn_non_finite_epsilon() -> None:
    assert check_bn(np.zeros(2), np.ones(2), float("inf")) == "non-finite BN epsilon"
    assert check_bn(np.zeros(2), np.ones(2), float("nan")) == "non-finite BN epsilon"


@FAST
@given(c=st.integers(1, 6), pos=st.integers(0, 5), eps=epsilons, below=st.floats(0, 10))
def test_check_bn_variance_plus_epsilon_not_positive(
    c: int, pos: int, eps: float, below: float
) -> None:
    var = np.ones(c)
    var[pos % c] = -eps - below  # var + eps <= 0
    assert check_bn(np.zeros(c), var, eps) == "variance + epsilon <= 0: BN is undefined"
    var[pos % c] = 1.0
    assert check_bn(np.zeros(c), var, eps) is None


def test_check_bn_overflowing_affine() -> None:
    # every input finite, but gamma / sqrt(var + eps) overflows float64
    reason = check_bn(np.zeros(2), np.array([1e-300, 1.0]), 0.0, np.array([1e300, 1.0]))
    assert reason == "BN folds to a non-finite scale or shift"
    assert check_affine(Affine(np.array([1.0, np.inf]), np.zeros(2))) == reason
    assert check_affine(Affine(np.ones(2), np.array([np.nan, 0.0]))) == reason


# ------------------------------------------------------------------------------------
# fold_backward: layer, then BN
# ------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_fold_backward_matches_layer_then_bn(data: st.DataObject) -> None:
    layer = data.draw(layers(), label="layer")
    bn = data.draw(bns(layer.channels), label="bn")
    expected = bn.ref(layer.apply(layer.x, layer.w, layer.b), layer.axis)

    w2, b2 = fold_backward(layer.w, layer.b, bn.affine(), layer.out_map)
    assert w2.shape == layer.w.shape and w2.dtype == np.float64
    assert b2.shape == (layer.channels,) and b2.dtype == np.float64
    got = layer.apply(layer.x, w2, b2)
    assert_close64(got, expected, magnitude(layer, w2, b2))

    # stored in the layer's dtype: one rounding per weight, error bounded by its epsilon
    dtype = layer.w.dtype
    if dtype != np.float64:
        wq, bq = round_to(w2, dtype), round_to(b2, dtype)
        assert wq.dtype == dtype and bq.dtype == dtype
        got_q = layer.apply(layer.x, wq.astype(np.float64), bq.astype(np.float64))
        info = finfo(dtype)
        tiny = float(info.smallest_subnormal)
        ones = layer.apply(np.abs(layer.x), np.ones_like(w2), np.ones_like(b2))
        bound = float(info.eps) * magnitude(layer, w2, b2) + tiny * ones
        bound += 1e-9 * (magnitude(layer, w2, b2) + np.abs(expected))
        assert np.all(np.abs(got_q - expected) <= bound)

    # rounding inside the fold (weight_dtype) gives exactly round_to of the float64 fold
    wd, bd = fold_backward(layer.w, layer.b, bn.affine(), layer.out_map, weight_dtype=dtype)
    assert wd.dtype == dtype and np.array_equal(bd, b2)
    np.testing.assert_array_equal(wd, round_to(w2, dtype))


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    dtype=st.sampled_from([np.float16, np.float32, np.float64, ml_dtypes.bfloat16]),
    big=st.booleans(),
)
def test_weight_dtype_rounds_once_or_raises_like_round_to(seed: int, dtype: Any, big: bool) -> None:
    r = np.random.default_rng(seed)
    w = r.normal(0, 1, (5, 3, 2)).astype(np.float32)
    scale = r.uniform(0.5, 2, 5) * (1e6 if big else 1.0)  # 1e6 overflows float16
    aff = Affine(scale, r.normal(0, 1, 5))
    cmap = channel_map(w.shape, (0,))
    w64, _ = fold_backward(w, None, aff, cmap)
    try:
        expected = round_to(w64, dtype)
    except OverflowError:
        with pytest.raises(OverflowError, match="overflow"):
            fold_backward(w, None, aff, cmap, weight_dtype=dtype)
        return
    got, _ = fold_backward(w, None, aff, cmap, weight_dtype=dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))
    # forward too (the input channels are axis 1 of the same weight)
    fwd = Affine(scale[:3], r.normal(0, 1, 3))
    imap = channel_map(w.shape, (1,))
    wf, bf = fold_forward(w, None, fwd, imap, cmap, 5)
    try:
        ef = round_to(wf, dtype)
    except OverflowError:
        with pytest.raises(OverflowError, match="overflow"):
            fold_forward(w, None, fwd, imap, cmap, 5, weight_dtype=dtype)
        return
    gf, gb = fold_forward(w, None, fwd, imap, cmap, 5, weight_dtype=dtype)
    np.testing.assert_array_equal(gf.astype(np.float64), ef.astype(np.float64))
    np.testing.assert_array_equal(gb, bf)


def test_fold_backward_grouped_conv_transpose_needs_the_group_view() -> None:
    """The bug several tools shipped: treating axis 1 of W[C_in, C_out/g, k] as C_out."""
    r = np.random.default_rng(3)
    groups, cin_g, cout_g, k = 2, 2, 3, (2,)
    w = r.normal(0, 1, (groups * cin_g, cout_g, *k))
    x = r.normal(0, 1, (1, groups * cin_g, 4))
    bn = BN(r.normal(0, 1, 6), r.uniform(0.5, 2, 6), 1e-5, r.uniform(0.5, 2, 6), None)
    expected = bn.ref(conv_transpose_ref(x, w, None, groups), 1)
    good = channel_map(w.shape, (0, 2), view=(groups, cin_g, cout_g, *k))
    w2, b2 = fold_backward(w, None, bn.affine(), good)
    np.testing.assert_allclose(conv_transpose_ref(x, w2, b2, groups), expected, rtol=1e-9)
    # the wrong map (axis 1 alone) indexes only channels 0..C_out/g-1: must differ
    wrong = channel_map(w.shape, (1,))
    w3, _ = fold_backward(w, None, bn.affine(), wrong)
    assert not np.allclose(conv_transpose_ref(x, w3, b2, groups), expected)


# ------------------------------------------------------------------------------------
# fold_forward: BN, then layer
# ------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), seed=seeds, cin=st.integers(1, 6), cout=st.integers(1, 6))
def test_fold_forward_dense(data: st.DataObject, seed: int, cin: int, cout: int) -> None:
    r = np.random.default_rng(seed)
    bn = data.draw(bns(cin))
    x = r.normal(0, 1, (3, cin))
    w = r.normal(0, 1, (cin, cout))
    b = r.normal(0, 1, cout) if data.draw(st.booleans()) else None
    expected = dense_ref(bn.ref(x, axis=1), w, b)
    w2, b2 = fold_forward(
        w, b, bn.affine(), channel_map(w.shape, (0,)), channel_map(w.shape, (1,)), cout
    )
    got = dense_ref(x, w2, b2)
    # magnitude of every term summed: |x||sW| + |t||W| + |b|
    t = np.abs(bn.affine().shift)
    mag = dense_ref(np.abs(x), np.abs(w2), None) + t @ np.abs(w) + (0 if b is None else np.abs(b))
    assert_close64(got, expected, mag)


@st.composite
def forward_convs(draw: st.DrawFn) -> dict[str, Any]:
    r = np.random.default_rng(draw(seeds))
    nd = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    s = tuple(kk + draw(st.integers(0, 3)) for kk in k)
    cin, cout = groups * cin_g, groups * cout_g
    w = r.normal(0, 1, (cout, cin_g, *k))
    return {
        "x": r.normal(0, 1, (2, cin, *s)),
        "w": w,
        "b": r.normal(0, 1, cout) if draw(st.booleans()) else None,
        "groups": groups,
        "cin": cin,
        "cout": cout,
        # input channel of W[o, r, ...] is (o // (C_out/g)) * (C_in/g) + r
        "in_map": channel_map(w.shape, (0, 2), view=(groups, cout_g, cin_g, *k)),
        "out_map": channel_map(w.shape, (0,)),
    }


def _conv_forward(c: dict[str, Any], aff: Affine) -> tuple[np.ndarray, np.ndarray]:
    return fold_forward(c["w"], c["b"], aff, c["in_map"], c["out_map"], c["cout"])


def _conv_magnitude(c: dict[str, Any], aff: Affine, w2: np.ndarray, pads: int = 0) -> np.ndarray:
    """|x| * |sW| + |t| * |W| + |b| summed like the convolution: bounds float64 error."""
    shift_image = np.broadcast_to(
        np.abs(aff.shift).reshape((1, -1) + (1,) * (c["x"].ndim - 2)), c["x"].shape
    )
    b = None if c["b"] is None else np.abs(c["b"])
    return conv_ref(np.abs(c["x"]), np.abs(w2), b, c["groups"], pads) + conv_ref(
        shift_image, np.abs(c["w"]), None, c["groups"], pads
    )


def _bn_input(c: dict[str, Any], aff: Affine) -> np.ndarray:
    shape = (1, -1) + (1,) * (c["x"].ndim - 2)
    return aff.scale.reshape(shape) * c["x"] + aff.shift.reshape(shape)


@FAST
@given(data=st.data())
def test_fold_forward_valid_grouped_conv(data: st.DataObject) -> None:
    c = data.draw(forward_convs())
    bn = data.draw(bns(c["cin"]))
    expected = conv_ref(bn.ref(c["x"], axis=1), c["w"], c["b"], c["groups"])
    w2, b2 = _conv_forward(c, bn.affine())
    got = conv_ref(c["x"], w2, b2, c["groups"])
    assert_close64(got, expected, _conv_magnitude(c, bn.affine(), w2))


@FAST
@given(data=st.data(), block=st.sampled_from([8, 64, 256]))
def test_fold_forward_bias_is_the_same_in_small_blocks(data: st.DataObject, block: int) -> None:
    """The forward bias is summed in blocks of rows (no weight-sized float64 product);
    tiny blocks must give the one-block sums (up to float64 summation order)."""
    from unittest import mock

    import bnfuse.fold as fold

    c = data.draw(forward_convs())
    bn = data.draw(bns(c["cin"]))
    _, whole = _conv_forward(c, bn.affine())
    with mock.patch.object(fold, "BLOCK_BYTES", block):
        _, blocked = _conv_forward(c, bn.affine())
    product = np.abs(c["w"]) * np.abs(bn.affine().shift[c["in_map"]])
    bound = np.bincount(
        np.broadcast_to(c["out_map"], c["w"].shape).ravel(),
        weights=product.ravel(),
        minlength=c["cout"],
    )
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-12 * (1 + bound.max()))


@FAST
@given(data=st.data(), pads=st.integers(1, 2), shift_seed=seeds)
def test_fold_forward_padded_conv_with_shift_is_wrong(
    data: st.DataObject, pads: int, shift_seed: int
) -> None:
    """Why bn-conv refuses padding: the original pads BN(x) with 0, the fold pads x with 0."""
    c = data.draw(forward_convs())
    r = np.random.default_rng(shift_seed)
    shift = r.uniform(0.5, 2.0, c["cin"]) * r.choice([-1.0, 1.0], c["cin"])
    aff = Affine(r.uniform(0.5, 2.0, c["cin"]), shift)
    expected = conv_ref(_bn_input(c, aff), c["w"], c["b"], c["groups"], pads)
    w2, b2 = _conv_forward(c, aff)
    got = conv_ref(c["x"], w2, b2, c["groups"], pads)
    # the interior (outputs whose window reaches no padding) agrees ...
    k = c["w"].shape[2:]
    window = (slice(pads, s + pads - kk + 1) for s, kk in zip(c["x"].shape[2:], k, strict=True))
    inner = (slice(None), slice(None), *window)
    mag = _conv_magnitude(c, aff, w2, pads)
    assert_close64(got[inner], expected[inner], mag[inner])
    # ... the border does not
    diff = np.max(np.abs(got - expected))
    assert diff > 1e-6 * max(1.0, float(np.max(np.abs(expected))))


@FAST
@given(data=st.data(), pads=st.integers(0, 2), seed=seeds)
def test_fold_forward_padded_conv_pure_scale_is_exact(
    data: st.DataObject, pads: int, seed: int
) -> None:
    c = data.draw(forward_convs())
    r = np.random.default_rng(seed)
    aff = Affine(r.uniform(-2.0, 2.0, c["cin"]), np.zeros(c["cin"]))
    expected = conv_ref(_bn_input(c, aff), c["w"], c["b"], c["groups"], pads)
    w2, b2 = _conv_forward(c, aff)
    if c["b"] is None:
        np.testing.assert_array_equal(b2, 0.0)
    got = conv_ref(c["x"], w2, b2, c["groups"], pads)
    assert_close64(got, expected, _conv_magnitude(c, aff, w2, pads))


# ------------------------------------------------------------------------------------
# channel_map
# ------------------------------------------------------------------------------------


@st.composite
def views(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(shape, view, axes): ``shape`` merges the first two dims of ``view`` (or not)."""
    view = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=5)))
    merge = draw(st.booleans())
    shape = (view[0] * view[1], *view[2:]) if merge else view
    nd = len(view)
    axes = tuple(
        draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=min(3, nd), unique=True))
    )
    # also exercise negative axes
    axes = tuple(a - nd if draw(st.booleans()) else a for a in axes)
    return shape, view, axes


@MEDIUM
@given(v=views())
def test_channel_map_matches_ravelled_indices(
    v: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
) -> None:
    shape, view, axes = v
    cmap = channel_map(shape, axes, view=view)
    assert cmap.ndim == len(shape)
    full = np.broadcast_to(cmap, shape)  # broadcastable to the weight
    nd = len(view)
    ax = sorted(a % nd for a in axes)
    idx = np.indices(view)
    expected = np.ravel_multi_index(tuple(idx[a] for a in ax), tuple(view[a] for a in ax))
    np.testing.assert_array_equal(full, expected.reshape(shape))
    n_channels = int(np.prod([view[a] for a in ax]))
    assert np.array_equal(np.unique(full), np.arange(n_channels))
    if view == shape:  # not materialised: size-1 on every non-channel axis
        assert all(cmap.shape[a] == (view[a] if a in ax else 1) for a in range(nd))


def test_channel_map_layout_examples() -> None:
    # ONNX Conv [C_out, C_in/g, k, k]
    assert channel_map((4, 2, 3, 3), (0,)).reshape(-1).tolist() == [0, 1, 2, 3]
    # Keras depthwise (k, k, in=2, mult=3): channel i*3+m
    dw = np.broadcast_to(channel_map((1, 1, 2, 3), (-2, -1)), (1, 1, 2, 3))
    assert dw[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    # ONNX ConvTranspose g=2, W[C_in=4, C_out/g=3, 1]: group 1 (rows 2,3) -> channels 3..5
    ct = channel_map((4, 3, 1), (0, 2), view=(2, 2, 3, 1))
    assert ct[:, :, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


@pytest.mark.parametrize(
    ("shape", "axes", "view", "message"),
    [
        ((4, 3, 2), (0,), (2, 2, 2, 2), "does not match weight shape"),  # 16 != 24 elements
        ((6,), (0,), (4,), "does not match weight shape"),
        ((4, 3), (0, 0), None, "repeat"),
        ((4, 3), (1, -1), None, "repeat"),  # the same axis, spelled twice
    ],
)
def test_channel_map_rejects_bad_view_or_axes(
    shape: tuple[int, ...], axes: tuple[int, ...], view: tuple[int, ...] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        channel_map(shape, axes, view=view)


# ------------------------------------------------------------------------------------
# round_to
# ------------------------------------------------------------------------------------


@MEDIUM
@given(
    dtype=st.sampled_from([np.dtype(np.float16), np.dtype(np.float32), BF16]),
    seed=seeds,
    log_scale=st.floats(-30, 4),
)
def test_round_to_equals_direct_cast_and_stays_finite(
    dtype: np.dtype[Any], seed: int, log_scale: float
) -> None:
    r = np.random.default_rng(seed)
    a = r.normal(0, 1, 64) * 10.0**log_scale
    assume(np.max(np.abs(a)) < float(finfo(dtype).max) / 2)
    out = round_to(a, dtype)
    assert out.dtype == dtype
    assert np.all(np.isfinite(out.astype(np.float64)))
    if dtype == BF16:
        # ml_dtypes' own cast goes through float32 (double rounding): check instead that
        # the result is a nearest bfloat16 value, against both neighbours.
        bits = out.view(np.uint16).astype(np.int64)
        got = out.astype(np.float64)
        for step in (-1, 1):
            nb = (bits + step).astype(np.uint16).view(BF16).astype(np.float64)
            assert np.all(np.abs(got - a) <= np.abs(nb - a))
        return
    expected = a.astype(dtype)
    np.testing.assert_array_equal(out.view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize(
    ("dtype", "x", "once"),
    [
        # 1 + 2^-11 + 2^-40: just above the fp16 midpoint between 1 and 1 + 2^-10; rounding
        # through float32 first lands exactly on the midpoint, which ties to even (1.0)
        (np.float16, 1 + 2**-11 + 2**-40, 1 + 2**-10),
        (np.float32, 1 + 2**-24 + 2**-40, 1 + 2**-23),  # any wider route would double-round
    ],
)
def test_round_to_rounds_once(dtype: Any, x: float, once: float) -> None:
    assert float(round_to(np.array([x]), dtype)[0]) == once
    assert float(round_to(np.array([-x]), dtype)[0]) == -once


def test_round_to_bfloat16_rounds_once() -> None:
    # 1 + 2^-8 + 2^-40 is just above the bf16 midpoint between 1 and 1 + 2^-7
    assert float(round_to(np.array([1 + 2**-8 + 2**-40]), BF16)[0]) == 1 + 2**-7


def test_round_to_float16_overflow_boundary() -> None:
    assert float(round_to(np.array([65504.0]), np.float16)[0]) == 65504.0
    assert float(round_to(np.array([-65519.99]), np.float16)[0]) == -65504.0  # rounds down
    for bad in (65520.0, 70000.0, -1e6, 1e300):
        with pytest.raises(OverflowError, match="float16"):
            round_to(np.array([1.0, bad]), np.float16)


def test_round_to_bfloat16_and_float32_overflow() -> None:
    top = float(ml_dtypes.finfo(BF16).max)
    assert float(round_to(np.array([top]), BF16)[0]) == top
    for bad in (3.4e38, -1e39, 1e300):
        with pytest.raises(OverflowError, match="bfloat16"):
            round_to(np.array([bad]), BF16)
    with pytest.raises(OverflowError, match="float32"):
        round_to(np.array([1e39]), np.float32)
    # no overflow check is needed for float64 itself
    np.testing.assert_array_equal(round_to(np.array([1e300]), np.float64), [1e300])


def test_round_to_passes_through_values_already_infinite() -> None:
    # only finite -> inf is an overflow; an inf input is the caller's business
    out = round_to(np.array([np.inf, 1.0]), np.float16)
    assert np.isinf(out[0]) and out[1] == 1.0


# ------------------------------------------------------------------------------------
# Affine
# ------------------------------------------------------------------------------------


@FAST
@given(seed=seeds, c=st.integers(1, 8))
def test_affine_then_composes(seed: int, c: int) -> None:
    r = np.random.default_rng(seed)
    first = Affine(r.normal(0, 2, c), r.normal(0, 2, c))
    second = Affine(r.normal(0, 2, c), r.normal(0, 2, c))
    x = r.normal(0, 3, (5, c))
    both = first.then(second)
    expected = second.scale * (first.scale * x + first.shift) + second.shift
    got = both.scale * x + both.shift
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.max(np.abs(expected)))
    # BN folding composes the same way: a BN followed by another BN
    assert both.channels == c
    # the order matters: second.then(first) is a different map in general
    swapped = second.then(first)
    other = first.scale * (second.scale * x + second.shift) + first.shift
    np.testing.assert_allclose(
        swapped.scale * x + swapped.shift, other, rtol=1e-12, atol=1e-12 * np.max(np.abs(other))
    )


def test_affine_identity() -> None:
    ident = Affine(np.ones(3), np.zeros(3))
    assert ident.is_identity
    assert not Affine(np.ones(3), np.array([0.0, 1e-30, 0.0])).is_identity
    assert not Affine(np.array([1.0, -1.0, 1.0]), np.zeros(3)).is_identity
    aff = Affine(np.array([2.0, 3.0, 4.0]), np.array([1.0, 0.0, -1.0]))
    for composed in (ident.then(aff), aff.then(ident)):
        np.testing.assert_array_equal(composed.scale, aff.scale)
        np.testing.assert_array_equal(composed.shift, aff.shift)


# ------------------------------------------------------------------------------------
# group views: maps broadcast to a reshape of the weight instead of a full-size copy
# ------------------------------------------------------------------------------------


@FAST
@given(
    seed=seeds,
    groups=st.integers(1, 4),
    c0=st.integers(1, 3),
    c1=st.integers(1, 3),
    k=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    transpose=st.booleans(),
    lazy=st.booleans(),
)
def test_group_view_folds_equal_full_map_folds(
    seed: int, groups: int, c0: int, c1: int, k: list[int], transpose: bool, lazy: bool
) -> None:
    """Backward (ConvTranspose) and forward (Conv, ConvTranspose) folds given the small
    map and ``view`` give exactly the weights and biases of the full-size map."""
    r = np.random.default_rng(seed)
    view = (groups, c0, c1, *k)
    w = r.normal(0, 1, (groups * c0, c1, *k)).astype(np.float32)
    dt = np.dtype(np.float32)

    def same(a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        assert np.asarray(a[0]).shape == w.shape
        np.testing.assert_array_equal(a[1], b[1])

    def full(axes: tuple[int, ...]) -> np.ndarray:
        return channel_map(w.shape, axes, view=view)

    # backward into ConvTranspose W[C_in, C_out/g, k]: output channel = axes (0, 2)
    n_out = groups * c1
    aff = Affine(r.uniform(0.5, 2, n_out), r.normal(0, 1, n_out))
    same(
        fold_backward(w, None, aff, channel_map(view, (0, 2)), dt, lazy, view=view),
        fold_backward(w, None, aff, full((0, 2)), dt, lazy),
    )
    # forward: Conv W[C_out, C_in/g, k] (in (0, 2), out (0, 1)) or ConvTranspose
    # W[C_in, C_out/g, k] (in (0, 1), out (0, 2))
    ins, outs = ((0, 1), (0, 2)) if transpose else ((0, 2), (0, 1))
    n_in = groups * (c0 if transpose else c1)
    n_out = groups * (c1 if transpose else c0)
    aff = Affine(r.uniform(0.5, 2, n_in), r.normal(0, 1, n_in))
    bias = r.normal(0, 1, n_out)
    small = fold_forward(
        w, bias, aff, channel_map(view, ins), channel_map(view, outs), n_out, dt, lazy, view=view
    )
    big = fold_forward(w, bias, aff, full(ins), full(outs), n_out, dt, lazy)
    np.testing.assert_array_equal(np.asarray(small[0]), np.asarray(big[0]))
    np.testing.assert_allclose(small[1], big[1], rtol=1e-12, atol=1e-12)  # summation order


@MEDIUM
@given(
    c=st.integers(0, 4),
    data=st.data(),
    eps=st.sampled_from([1e-5, 0.0, -1.0, float("inf"), float("nan")]),
)
def test_checked_bn_affine_fast_path_agrees_with_the_detailed_checks(
    c: int, data: st.DataObject, eps: float
) -> None:
    """The one-pass path returns exactly the detailed path's affine, and defers to it
    (None) whenever that path finds a reason: NaN/Inf anywhere, var + eps <= 0, an
    overflowing affine, scalar-broadcast statistics, no gamma or beta."""
    from unittest import mock

    import bnfuse.fold as fold

    values = st.sampled_from([0.0, 1.0, -2.0, 0.5, 1e-300, 1e308, float("inf"), float("nan")])

    def vec(optional: bool) -> np.ndarray | None:
        if optional and data.draw(st.booleans()):
            return None
        n = data.draw(st.sampled_from([c, 1])) if c != 1 else 1
        return np.array(data.draw(st.lists(values, min_size=n, max_size=n)), np.float64)

    mean = vec(False)
    assert mean is not None
    var, gamma, beta = vec(False), vec(True), vec(True)
    try:
        got = fold.checked_bn_affine(mean, var, eps, gamma, beta)
    except ValueError:  # lengths that do not broadcast: both paths raise
        with (
            mock.patch.object(fold, "_finite_bn_affine", lambda *a: None),
            pytest.raises(ValueError),
        ):
            fold.checked_bn_affine(mean, var, eps, gamma, beta)
        return
    with mock.patch.object(fold, "_finite_bn_affine", lambda *a: None):
        want = fold.checked_bn_affine(mean, var, eps, gamma, beta)
    if isinstance(want, str):
        assert got == want
    else:
        assert isinstance(got, Affine)
        np.testing.assert_array_equal(got.scale, want.scale)
        np.testing.assert_array_equal(got.shift, want.shift)
