"""bnfuse.stats: moment merging (property tests), comparison, flags, widening."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bnfuse.errors import UsageError
from bnfuse.stats import (
    SCALE_LIMIT,
    Moments,
    compare,
    is_default,
    limits,
    max_scale,
    weight_flag,
    widening,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def data_and_splits(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    n = draw(st.integers(1, 40))
    c = draw(st.integers(1, 4))
    x = draw(arrays(np.float32, (n, c, 3), elements=finite))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return x, cuts


@settings(max_examples=150, deadline=None)
@given(data_and_splits())
def test_any_split_merges_to_the_one_batch_moments(case: tuple[np.ndarray, list[int]]) -> None:
    x, cuts = case
    whole = Moments.of(x, (1,))
    parts = np.split(x, cuts, axis=0)  # empty parts included
    merged = Moments.of(parts[0], (1,))
    for p in parts[1:]:
        merged = merged.merge(Moments.of(p, (1,)))
    assert merged.count == whole.count == x.shape[0] * x.shape[2]
    x64 = x.astype(np.float64)
    ref_mean = x64.mean(axis=(0, 2))
    ref_var = x64.var(axis=(0, 2))  # population variance, as documented
    scale = 1.0 + np.abs(x64).max()
    np.testing.assert_allclose(merged.mean, ref_mean, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.var, ref_var, rtol=1e-9, atol=1e-12 * scale**2)
    np.testing.assert_allclose(whole.var, ref_var, rtol=1e-9, atol=1e-12 * scale**2)


@settings(max_examples=60, deadline=None)
@given(data_and_splits(), st.randoms(use_true_random=False))
def test_merging_is_order_free(case: tuple[np.ndarray, list[int]], rnd: object) -> None:
    x, cuts = case
    parts = [Moments.of(p, (1,)) for p in np.split(x, cuts, axis=0)]
    rnd.shuffle(parts)  # type: ignore[attr-defined]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    whole = Moments.of(x, (1,))
    scale = 1.0 + float(np.abs(x).max())
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-9 * scale**2)


def test_list_axes_are_per_element_and_channels_last_is_an_axis() -> None:
    x = np.random.default_rng(0).normal(size=(5, 4, 3, 2))
    m = Moments.of(x, (1, 3))  # a Keras 2 BN over axes [1, 3]
    assert m.mean.shape == (4, 2) and m.count == 15
    np.testing.assert_allclose(m.mean, x.mean(axis=(0, 2)))
    np.testing.assert_allclose(m.var, x.var(axis=(0, 2)))
    last = Moments.of(x, (-1,))
    np.testing.assert_allclose(last.var, x.reshape(-1, 2).var(axis=0))
    with pytest.raises(ValueError):
        Moments.of(x, (1, -3))


def test_large_offset_keeps_the_variance() -> None:
    # E[x^2] - E[x]^2 would lose every digit here; the two-pass / Chan merge does not
    x = 1e8 + np.random.default_rng(1).normal(size=(1000, 1))
    parts = np.split(x, [3, 500, 501])
    m = Moments.of(parts[0], (1,))
    for p in parts[1:]:
        m = m.merge(Moments.of(p, (1,)))
    np.testing.assert_allclose(m.var, x.var(axis=0), rtol=1e-6)


def test_statistics_from_the_same_data_are_ok_even_for_few_values() -> None:
    r = np.random.default_rng(3)
    for n in (2, 3, 5, 50, 5000):
        x = r.normal(3.0, 2.0, size=(n, 8))
        m = Moments.of(x, (1,))
        for ddof in (0, 1):  # population or sample variance stored as the moving one
            c = compare(m, x.mean(0), x.var(0, ddof=ddof), 1e-3, r.uniform(0.5, 2, 8))
            assert c.flag == "ok", (n, ddof, c)
            assert c.mean_shift < 1e-9


def test_a_sample_of_the_training_distribution_is_ok() -> None:
    r = np.random.default_rng(4)
    for n in (4, 16, 256):
        x = r.normal(1.0, 3.0, size=(n, 32))
        c = compare(Moments.of(x, (1,)), np.full(32, 1.0), np.full(32, 9.0), 1e-5)
        assert c.flag == "ok", (n, c)


def test_statistics_after_a_few_momentum_updates_drift() -> None:
    r = np.random.default_rng(5)
    x = r.normal(4.0, 3.0, size=(256, 6))
    mean, var = np.zeros(6), np.ones(6)
    for _ in range(5):  # Keras/PyTorch moving average, momentum 0.99
        b = x[r.choice(256, 32)]
        mean = 0.99 * mean + 0.01 * b.mean(0)
        var = 0.99 * var + 0.01 * b.var(0)
    c = compare(Moments.of(x, (1,)), mean, var, 1e-3)
    assert c.flag == "drift" and c.mean_shift > 3 and c.var_ratio > 2
    assert "mean off" in c.note and "variance off" in c.note


def test_default_and_tiny_variance_from_the_weights_alone() -> None:
    assert is_default(np.zeros(3), np.ones(3), None, None)
    assert is_default(np.zeros(3), np.ones(3), np.ones(3), np.zeros(3))
    assert not is_default(np.zeros(3), np.ones(3), np.ones(3), np.full(3, 0.1))
    assert weight_flag(np.zeros(3), np.ones(3), 1e-3)[0] == "default"
    flag, note = weight_flag(np.ones(3), np.array([1.0, 1e-9, 1.0]), 1e-5)
    assert flag == "tiny-variance" and "316" in note
    assert max_scale(np.array([1e-9]), 1e-5) == pytest.approx(1 / math.sqrt(1e-5 + 1e-9))
    assert max_scale(np.array([1e-4]), 1e-5, np.array([0.5])) < SCALE_LIMIT
    assert weight_flag(np.array([np.nan]), np.ones(1), 1e-3)[0] == "invalid"
    assert weight_flag(np.ones(2), np.ones(2), 1e-3)[0] == "ok"


def test_default_statistics_stay_flagged_with_data() -> None:
    x = np.random.default_rng(6).normal(0, 1, size=(4000, 3))
    c = compare(Moments.of(x, (1,)), np.zeros(3), np.ones(3), 1e-3)
    assert c.flag == "default" and "agree" in c.note
    y = x * 5 + 2
    c = compare(Moments.of(y, (1,)), np.zeros(3), np.ones(3), 1e-3)
    assert c.flag == "default" and "mean off" in c.note


def test_too_few_values_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="too few samples"):
        compare(Moments.of(np.ones((1, 3)), (1,)), np.zeros(3), np.ones(3), 1e-3)


def test_limits_grow_for_small_samples_and_keep_their_floors() -> None:
    lm, lv = limits(10**6)
    assert lm == 0.5 and lv == 2.0
    lm2, lv2 = limits(4)
    assert lm2 > lm and lv2 > lv


def test_widening_and_scale_spread() -> None:
    w = np.array([[1.0, -2.0], [0.5, 0.0]])
    s = np.array([[3.0], [0.25]])
    ratio, spread = widening([w], [w * s])
    assert ratio == pytest.approx(6.0 / 2.0) and spread == pytest.approx(12.0)
    assert widening([np.zeros((2, 2))], [np.zeros((2, 2))]) == (None, None)
    assert widening([w], [w * np.array([[0.0], [1.0]])])[1] == math.inf
