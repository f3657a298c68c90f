"""Output comparison (bnfuse.validate) and bisection of failing folds (bnfuse.api)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfuse.api import bisect_culprits
from bnfuse.backend import InputSpec
from bnfuse.errors import FusionInvariantError, UnsupportedModelError, UsageError
from bnfuse.result import Fold
from bnfuse.validate import coarsest_float, compare, default_tolerance, output_metrics

Fn = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


class FakeRunner:
    """A Runner over a numpy function of the feeds."""

    def __init__(
        self, fn: Fn, output_names: Sequence[str] = ("y",), runtime: str = "numpy"
    ) -> None:
        self.fn = fn
        self._names = list(output_names)
        self.runtime = runtime
        self.calls = 0

    @property
    def inputs(self) -> Sequence[InputSpec]:
        return [InputSpec("x", np.dtype(np.float32), ("N", 4))]

    @property
    def output_names(self) -> Sequence[str]:
        return self._names

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        return self.fn(feeds)


W = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)


def feeds(n: int = 4, rows: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, 4)).astype(np.float32)} for _ in range(n)]


def linear(f: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [f["x"] @ W]


def run_compare(ref: Fn, fused: Fn, **kw: Any) -> Any:
    kw.setdefault("rtol", None)
    kw.setdefault("atol", None)
    return compare(FakeRunner(ref), FakeRunner(fused), feeds(), input_source="test", **kw)


# ------------------------------------------------------------------ compare


def test_identical_models_pass_with_zero_error() -> None:
    v = compare(
        FakeRunner(linear, runtime="fake rt"),
        FakeRunner(linear),
        feeds(5),
        rtol=None,
        atol=None,
        input_source="random (seed 0)",
    )
    assert v.passed and v.samples == 5 and v.runtime == "fake rt"
    assert v.input_source == "random (seed 0)"
    (o,) = v.outputs
    assert o.passed and o.name == "y" and o.dtype == "float32" and o.shape == (3, 5)
    assert o.max_abs_error == 0 and o.max_rel_error == 0 and o.mean_abs_error == 0
    assert o.cosine_similarity == pytest.approx(1.0)
    assert o.min_atol == 0.0 and o.mismatches == 0 and o.elements == 5 * 3 * 5
    assert o.top1_agreement == 1.0


def test_runtime_defaults_to_unknown() -> None:
    class Bare(FakeRunner):
        def __getattribute__(self, name: str) -> Any:
            if name == "runtime":
                raise AttributeError(name)
            return super().__getattribute__(name)

    v = compare(Bare(linear), Bare(linear), feeds(1), rtol=None, atol=None, input_source="t")
    assert v.runtime == "unknown"


def test_corrupted_output_fails() -> None:
    def corrupted(f: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        y = linear(f)[0].copy()
        y[0, 2] += 0.1
        return [y]

    v = run_compare(linear, corrupted)
    assert not v.passed
    (o,) = v.outputs
    assert not o.passed
    assert o.mismatches == 4  # one element per sample
    assert "4 of 60 elements out of tolerance" in o.reason
    assert o.max_abs_error == pytest.approx(0.1, rel=1e-5)


def test_metrics_on_hand_computed_example() -> None:
    ref = np.array([[1.0, -2.0, 4.0, 0.0]], np.float32)
    fused = np.array([[1.5, -2.0, 3.0, 0.25]], np.float32)
    o = output_metrics("y", [ref], [fused], rtol=0.1, atol=0.2)
    assert o.max_abs_error == pytest.approx(1.0)
    # relative error only where |ref| > atol: 0.5/1, 0/2, 1/4 -> 0.5 (the 0 element is skipped)
    assert o.max_rel_error == pytest.approx(0.5)
    assert o.mean_abs_error == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    r, f = ref.astype(np.float64).ravel(), fused.astype(np.float64).ravel()
    cos = float(r @ f / np.linalg.norm(r) / np.linalg.norm(f))
    assert o.cosine_similarity == pytest.approx(cos)
    # need atol >= |f-r| - 0.1|r|: 0.4, 0, 0.6, 0.25 -> 0.6
    assert o.min_atol == pytest.approx(0.6)
    assert (o.rtol, o.atol) == (0.1, 0.2)
    assert not o.passed and o.mismatches == 3  # 0.25 > 0.2 fails too
    assert o.top1_agreement == 1.0  # argmax 2 vs 2 (4.0 vs 3.0)


def test_top1_agreement_counts_rows() -> None:
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.3]], np.float32)
    fused = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]], np.float32)
    assert output_metrics("p", [ref], [fused], rtol=None, atol=None).top1_agreement == 0.5
    # not a [N, classes] score matrix: no top-1
    assert (
        output_metrics("p", [ref[:, :1]], [ref[:, :1]], rtol=None, atol=None).top1_agreement is None
    )
    assert (
        output_metrics("p", [ref.ravel()], [ref.ravel()], rtol=None, atol=None).top1_agreement
        is None
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rtol", [0.0, 1e-4, 1e-3])
def test_min_atol_is_the_smallest_passing_atol(seed: int, rtol: float) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((8, 10)).astype(np.float32) * 3
    fused = ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-3
    m = output_metrics("y", [ref], [fused], rtol=rtol, atol=0.0).min_atol
    assert m > 0
    assert output_metrics("y", [ref], [fused], rtol=rtol, atol=m).passed
    assert not output_metrics("y", [ref], [fused], rtol=rtol, atol=0.99 * m).passed


def test_min_atol_is_zero_within_rtol_and_inf_for_nan() -> None:
    ref = np.array([1.0, 2.0], np.float32)
    assert output_metrics("y", [ref], [ref * 1.00001], rtol=1e-3, atol=0.0).min_atol == 0.0
    bad = np.array([1.0, np.nan], np.float32)
    assert output_metrics("y", [ref], [bad], rtol=1e-3, atol=0.0).min_atol == float("inf")


def test_nonfinite_rules() -> None:
    ref = np.array([np.inf, -np.inf, np.nan, 1.0], np.float32)
    same = output_metrics("y", [ref], [ref.copy()], rtol=None, atol=None)
    assert same.passed and same.mismatches == 0
    nan_where_finite = np.array([np.inf, -np.inf, np.nan, np.nan], np.float32)
    o = output_metrics("y", [ref], [nan_where_finite], rtol=None, atol=None)
    assert not o.passed and o.mismatches == 1 and o.max_abs_error == float("inf")
    assert "non-finite" in o.reason
    flipped = np.array([-np.inf, -np.inf, np.nan, 1.0], np.float32)
    assert not output_metrics("y", [ref], [flipped], rtol=None, atol=None).passed
    finite_for_nan = np.array([np.inf, -np.inf, 0.0, 1.0], np.float32)
    assert not output_metrics("y", [ref], [finite_for_nan], rtol=None, atol=None).passed


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol_base"),
    [
        (np.float32, 1e-4, 1e-5),
        (np.float16, 1e-2, 1e-3),
        (ml_dtypes.bfloat16, 3e-2, 1e-2),
        (np.float64, 1e-7, 1e-9),
        (np.int64, 0.0, 0.0),
        (np.bool_, 0.0, 0.0),
    ],
)
def test_default_tolerance_per_dtype(dtype: Any, rtol: float, atol_base: float) -> None:
    dt = np.dtype(dtype)
    assert default_tolerance(dt, 0.5) == (rtol, atol_base)  # max(1, 0.5) = 1
    assert default_tolerance(dt, 250.0) == (rtol, pytest.approx(atol_base * 250.0))
    ref = np.array([[250.0, -3.0]]).astype(dt)
    o = output_metrics("y", [ref], [ref], rtol=None, atol=None)
    assert o.rtol == rtol and o.atol == pytest.approx(atol_base * 250.0)
    assert o.dtype == dt.name


def test_atol_scales_with_magnitude_over_all_samples() -> None:
    small = np.array([0.5, 0.25], np.float32)
    big = np.array([-400.0, 1.0], np.float32)
    o = output_metrics("y", [small, big], [small, big], rtol=None, atol=None)
    assert o.atol == pytest.approx(1e-5 * 400)


def test_user_tolerance_overrides_defaults() -> None:
    ref = np.array([1.0, 2.0], np.float32)
    fused = ref + np.float32(0.05)
    assert not output_metrics("y", [ref], [fused], rtol=None, atol=None).passed
    o = output_metrics("y", [ref], [fused], rtol=0.0, atol=0.06)
    assert o.passed and (o.rtol, o.atol) == (0.0, 0.06)
    ints = np.array([1, 2, 3], np.int64)
    assert not output_metrics("y", [ints], [ints + 1], rtol=None, atol=None).passed
    assert output_metrics("y", [ints], [ints + 1], rtol=None, atol=1.0).passed


def test_integer_outputs_compare_exactly_beyond_float64_precision() -> None:
    ref = np.array([2**60], np.int64)
    assert not output_metrics("y", [ref], [ref + 1], rtol=None, atol=None).passed
    assert output_metrics("y", [ref], [ref.copy()], rtol=None, atol=None).passed


def test_errors_are_computed_in_float64() -> None:
    ref = np.array([1.0], np.float16)
    fused = np.array([1.0009765625], np.float16)  # next float16 after 1
    assert output_metrics("y", [ref], [fused], rtol=None, atol=None).max_abs_error == 2**-10


def test_shape_or_dtype_mismatch_fails_with_reason() -> None:
    o = output_metrics(
        "y", [np.zeros((1, 3), np.float32)], [np.zeros((1, 4), np.float32)], rtol=None, atol=None
    )
    assert not o.passed and "shape" in o.reason
    o = output_metrics(
        "y", [np.zeros((1, 3), np.float32)], [np.zeros((1, 3), np.float16)], rtol=None, atol=None
    )
    assert not o.passed and "dtype float16" in o.reason


def test_output_count_mismatch_is_an_invariant_error() -> None:
    ref = FakeRunner(lambda f: [f["x"], f["x"]], ("a", "b"))
    fused = FakeRunner(lambda f: [f["x"]], ("a",))
    with pytest.raises(FusionInvariantError, match="outputs"):
        compare(ref, fused, feeds(1), rtol=None, atol=None, input_source="t")


def test_outputs_matched_by_position_and_renames_recorded() -> None:
    ref = FakeRunner(lambda f: [f["x"], 2 * f["x"]], ("a", "b"))
    fused = FakeRunner(lambda f: [f["x"], 2 * f["x"] + 1], ("a", "b_fused"))
    v = compare(ref, fused, feeds(2), rtol=None, atol=None, input_source="t")
    assert [o.name for o in v.outputs] == ["a", "b"]
    assert v.outputs[0].passed and not v.outputs[1].passed and not v.passed
    assert v.outputs[0].fused_name == "" and v.outputs[1].fused_name == "b_fused"


def _raises(f: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    raise RuntimeError("[RuntimeError] : 1 : FAIL : node conv3\nsecond line")


def test_runtime_failures_become_documented_errors() -> None:
    # the original failing to run: the model is beyond the runtime, one line
    with pytest.raises(UnsupportedModelError, match=r"fails to run: .*node conv3$"):
        compare(
            FakeRunner(_raises),
            FakeRunner(linear),
            feeds(1),
            rtol=None,
            atol=None,
            input_source="t",
        )
    # the fused model failing where the original ran: a bnfuse bug
    with pytest.raises(FusionInvariantError, match="fused model fails to run where"):
        compare(
            FakeRunner(linear),
            FakeRunner(_raises),
            feeds(1),
            rtol=None,
            atol=None,
            input_source="t",
        )


def test_every_feed_runs_on_both_sides() -> None:
    ref, fused = FakeRunner(linear), FakeRunner(linear)
    compare(ref, fused, feeds(7), rtol=None, atol=None, input_source="t")
    assert ref.calls == fused.calls == 7


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        compare(FakeRunner(linear), FakeRunner(linear), [], rtol=None, atol=None, input_source="t")
    with pytest.raises(UsageError, match="rtol"):
        run_compare(linear, linear, rtol=-1.0)
    with pytest.raises(UsageError, match="atol"):
        run_compare(linear, linear, atol=float("nan"))


finite_f32 = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    elements=st.floats(-1e6, 1e6, width=32),
)


@settings(max_examples=60, deadline=None)
@given(finite_f32)
def test_property_identical_outputs_always_pass(ref: np.ndarray) -> None:
    o = output_metrics("y", [ref], [ref.copy()], rtol=None, atol=None)
    assert o.passed and o.max_abs_error == 0 and o.min_atol == 0
    assert -1.0 <= o.cosine_similarity <= 1.0


@settings(max_examples=60, deadline=None)
@given(finite_f32, st.floats(0, 1e-2), st.integers(0, 2**32 - 1))
def test_property_metrics_are_consistent(ref: np.ndarray, noise: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fused = (ref + rng.standard_normal(ref.shape) * noise).astype(np.float32)
    o = output_metrics("y", [ref], [fused], rtol=1e-4, atol=None)
    assert -1.0 <= o.cosine_similarity <= 1.0
    assert 0 <= o.mean_abs_error <= o.max_abs_error
    assert o.min_atol >= 0
    assert o.passed == (o.mismatches == 0)
    assert output_metrics("y", [ref], [fused], rtol=1e-4, atol=o.min_atol).passed
    assert o.passed == (o.min_atol <= o.atol)


# ------------------------------------------------------------------ bisection


def folds(n: int) -> list[Fold]:
    return [
        Fold(bn=f"bn{i}", into=f"conv{i}", rule="r", direction="backward", channels=1)
        for i in range(n)
    ]


def oracle(culprits: set[str], log: list[int] | None = None) -> Callable[[Sequence[Fold]], bool]:
    def passes_with(subset: Sequence[Fold]) -> bool:
        if log is not None:
            log.append(len(subset))
        return not any(f.bn in culprits for f in subset)

    return passes_with


def test_bisect_finds_one_culprit() -> None:
    calls: list[int] = []
    found = bisect_culprits(folds(16), oracle({"bn11"}, calls))
    assert [f.bn for f in found] == ["bn11"]
    assert len(calls) <= 2 + 2 * 5  # O(log n) validations per culprit


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("position", ["first", "last"])
def test_bisect_single_culprit_any_position(n: int, position: str) -> None:
    name = "bn0" if position == "first" else f"bn{n - 1}"
    assert [f.bn for f in bisect_culprits(folds(n), oracle({name}))] == [name]


def test_bisect_finds_two_culprits() -> None:
    found = bisect_culprits(folds(10), oracle({"bn2", "bn8"}))
    assert sorted(f.bn for f in found) == ["bn2", "bn8"]


def test_bisect_finds_an_interaction_pair() -> None:
    # only bn1 and bn4 together break the model: both are needed to make it pass again
    def passes_with(subset: Sequence[Fold]) -> bool:
        names = {f.bn for f in subset}
        return not {"bn1", "bn4"} <= names

    found = bisect_culprits(folds(6), passes_with)
    assert [f.bn for f in found] == ["bn4"]  # dropping bn4 alone is enough
    assert passes_with([f for f in folds(6) if f not in found])


def test_bisect_no_culprit_when_all_pass() -> None:
    calls: list[int] = []
    assert bisect_culprits(folds(5), oracle(set(), calls)) == []
    assert calls == [5]


def test_bisect_respects_limit() -> None:
    found = bisect_culprits(folds(8), oracle({f"bn{i}" for i in range(8)}), limit=3)
    assert len(found) == 3


# ------------------------------------------------------------------ compute dtype


def test_compute_dtype_loosens_float_outputs_to_the_coarser_type() -> None:
    ref = np.linspace(-3, 3, 12).astype(np.float32)
    fused = (ref * np.float32(1 + 3e-3)).astype(np.float32)  # float16-sized rounding
    assert not output_metrics("y", [ref], [fused], rtol=None, atol=None).passed
    o = output_metrics("y", [ref], [fused], rtol=None, atol=None, compute_dtype="float16")
    assert o.passed and (o.rtol, o.atol) == pytest.approx((1e-2, 1e-3 * 3))
    # a finer compute type never tightens, a user tolerance still wins, ints stay exact
    tight = output_metrics("y", [ref], [fused], rtol=None, atol=None, compute_dtype="float64")
    assert not tight.passed and tight.rtol == 1e-4
    user = output_metrics("y", [ref], [fused], rtol=1e-5, atol=0.0, compute_dtype="float16")
    assert not user.passed
    ints = np.array([1, 2, 3], np.int64)
    assert not output_metrics(
        "y", [ints], [ints + 1], rtol=None, atol=None, compute_dtype="float16"
    ).passed


def test_compare_takes_the_reference_runners_compute_dtype() -> None:
    def noisy(f: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [(linear(f)[0] * np.float32(1 + 3e-3)).astype(np.float32)]

    plain = FakeRunner(linear)
    half = FakeRunner(linear)
    half.compute_dtype = "float16"  # type: ignore[attr-defined]
    kw: dict[str, Any] = {"rtol": None, "atol": None, "input_source": "t"}
    assert not compare(plain, FakeRunner(noisy), feeds(), **kw).passed
    assert compare(half, FakeRunner(noisy), feeds(), **kw).passed


def test_coarsest_float() -> None:
    assert coarsest_float(["float32", "float16", "int64"]) == "float16"
    assert coarsest_float(["float32", "bfloat16", "float16"]) == "bfloat16"
    assert coarsest_float(["float64", "float32"]) == "float32"
    assert coarsest_float(["int8", "None"]) is None
