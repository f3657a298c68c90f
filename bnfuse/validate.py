"""Compare the fused model's outputs with the original's. Imports numpy only.

Both models run on the same feeds in the same runtime (for ONNX: onnxruntime with graph
optimizations disabled on both sides, so the reference is not silently fused already).
Outputs are matched by position. An element passes when

    |fused - ref| <= atol + rtol * |ref|

computed in float64; identical non-finite values (NaN and NaN, +inf and +inf) pass, any
other non-finite value on either side fails. Default tolerances depend on the reference
output's dtype (see :data:`DEFAULT_TOLERANCES`), or on the coarser float type the model
computes in when its runner names one (``compute_dtype``: a float32 output of float16
arithmetic, as mixed precision and float16 conversions that keep float32 inputs and outputs
write, carries float16's rounding on both sides); ``atol`` is scaled by
``max(1, max|ref|)`` over every sample of that output, so a logit layer in the hundreds is
not judged like a softmax. A user-given ``rtol``/``atol`` is used as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnfuse.backend import Runner
from bnfuse.errors import (
    BnfuseError,
    FusionInvariantError,
    UnsupportedModelError,
    UsageError,
    first_line,
)
from bnfuse.inputs import is_float_dtype
from bnfuse.result import OutputMetrics, Validation

__all__ = [
    "DEFAULT_TOLERANCES",
    "coarsest_float",
    "compare",
    "default_tolerance",
    "output_metrics",
]

F64 = NDArray[np.float64]

#: dtype name -> (rtol, atol base); the atol actually used is ``base * max(1, max|ref|)``.
#: Integer and bool outputs compare exactly. Other low-precision floats (float8 ...) use
#: the bfloat16 entry.
DEFAULT_TOLERANCES: Mapping[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (3e-2, 1e-2),
}


def default_tolerance(dtype: np.dtype[Any], max_abs_ref: float) -> tuple[float, float]:
    """Default ``(rtol, atol)`` for an output of ``dtype`` whose largest finite |value| is
    ``max_abs_ref``; ``(0, 0)`` (exact) for integer, bool and non-float outputs."""
    dt = np.dtype(dtype)
    if not is_float_dtype(dt):
        return 0.0, 0.0
    rtol, base = DEFAULT_TOLERANCES.get(dt.name, DEFAULT_TOLERANCES["bfloat16"])
    if dt.name not in DEFAULT_TOLERANCES and dt.kind == "f" and dt.itemsize >= 8:
        rtol, base = DEFAULT_TOLERANCES["float64"]  # longdouble
    return rtol, base * max(1.0, float(max_abs_ref))


def coarsest_float(names: Iterable[str]) -> str | None:
    """The dtype name among ``names`` with the loosest default tolerance (``None`` when
    none is a float type of :data:`DEFAULT_TOLERANCES`): what a runner reports as its
    model's ``compute_dtype``."""
    known = [n for n in set(names) if n in DEFAULT_TOLERANCES]
    return max(known, key=lambda n: DEFAULT_TOLERANCES[n][0], default=None)


def _tolerance(dt: np.dtype[Any], max_ref: float, compute_dtype: str | None) -> tuple[float, float]:
    """The default tolerance of an output of ``dt``, or of ``compute_dtype`` when the model
    computes in that coarser float type."""
    rtol, atol = default_tolerance(dt, max_ref)
    if compute_dtype is not None and compute_dtype in DEFAULT_TOLERANCES and is_float_dtype(dt):
        c_rtol, c_base = DEFAULT_TOLERANCES[compute_dtype]
        if c_rtol > rtol:
            return c_rtol, c_base * max(1.0, max_ref)
    return rtol, atol


def _f64(arr: np.ndarray) -> F64:
    if np.dtype(arr.dtype).kind == "c":
        raise UsageError("bnfuse cannot validate complex-valued outputs")
    return np.asarray(arr).astype(np.float64)


def _pass_mask(
    ref: F64, fused: F64, rtol: float, atol: float, exact: NDArray[np.bool_] | None
) -> NDArray[np.bool_]:
    """Element-wise pass/fail; ``exact`` (native ``ref == fused``) decides when tol is 0."""
    finite = np.isfinite(ref) & np.isfinite(fused)
    with np.errstate(invalid="ignore", over="ignore"):
        if exact is not None and rtol == 0.0 and atol == 0.0:
            ok = finite & exact
        else:
            ok = finite & (np.abs(fused - ref) <= atol + rtol * np.abs(ref))
        same_nonfinite = ~np.isfinite(ref) & ((ref == fused) | (np.isnan(ref) & np.isnan(fused)))
    return ok | same_nonfinite


def _min_atol(ref: F64, fused: F64, rtol: float, exact: NDArray[np.bool_] | None) -> float:
    """The smallest atol for which every element passes at ``rtol`` (inf if none does)."""
    finite = np.isfinite(ref) & np.isfinite(fused)
    same_nonfinite = ~np.isfinite(ref) & ((ref == fused) | (np.isnan(ref) & np.isnan(fused)))
    if not np.all(finite | same_nonfinite):
        return float("inf")
    if not np.any(finite):
        return 0.0
    r, f = ref[finite], fused[finite]
    ex = exact[finite] if exact is not None else None
    m = max(0.0, float(np.max(np.abs(f - r) - rtol * np.abs(r))))
    # (d - x) + x can round below d: step up until the pass rule really accepts m.
    for _ in range(64):
        if bool(np.all(_pass_mask(r, f, rtol, m, ex))):
            return m
        m = float(np.nextafter(m, np.inf))
    return m * (1.0 + 1e-12)


def _cosine(ref: F64, fused: F64) -> float:
    finite = np.isfinite(ref) & np.isfinite(fused)
    a, b = ref[finite], fused[finite]
    # Scale first so huge values do not overflow the dot product.
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    if scale == 0.0:
        return 1.0  # both all zeros (or nothing finite): identical
    a, b = a / scale, b / scale
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _tolerance_reason(mismatches: int, elements: int, nonfinite: bool) -> str:
    if mismatches == 0:
        return ""
    what = "non-finite or out of tolerance" if nonfinite else "out of tolerance"
    return f"{mismatches} of {elements} elements {what}"


def output_metrics(
    name: str,
    ref: Sequence[np.ndarray],
    fused: Sequence[np.ndarray],
    *,
    rtol: float | None,
    atol: float | None,
    fused_name: str = "",
    compute_dtype: str | None = None,
) -> OutputMetrics:
    """Metrics of one output over all samples (``ref[i]`` and ``fused[i]`` from run ``i``);
    ``compute_dtype`` (a :data:`DEFAULT_TOLERANCES` name) loosens the default tolerance of a
    float output to that type's when it is coarser than the output's own."""
    ref_dt = np.dtype(ref[0].dtype)
    shape = tuple(int(d) for d in np.shape(ref[0]))
    r64 = np.concatenate([_f64(r).reshape(-1) for r in ref])
    finite_ref = r64[np.isfinite(r64)]
    max_ref = float(np.max(np.abs(finite_ref))) if finite_ref.size else 0.0
    d_rtol, d_atol = _tolerance(ref_dt, max_ref, compute_dtype)
    use_rtol = d_rtol if rtol is None else float(rtol)
    use_atol = d_atol if atol is None else float(atol)

    reason = ""
    for i, (r, f) in enumerate(zip(ref, fused, strict=True)):
        if np.shape(r) != np.shape(f):
            reason = (
                f"shape {tuple(np.shape(f))} differs from the original's "
                f"{tuple(np.shape(r))} (sample {i})"
            )
            break
        if np.dtype(f.dtype) != ref_dt:
            reason = f"dtype {np.dtype(f.dtype).name} differs from the original's {ref_dt.name}"
            break
    if reason:
        nan = float("nan")
        return OutputMetrics(
            name=name,
            max_abs_error=nan,
            max_rel_error=nan,
            mean_abs_error=nan,
            cosine_similarity=nan,
            top1_agreement=None,
            min_atol=float("inf"),
            rtol=use_rtol,
            atol=use_atol,
            passed=False,
            dtype=ref_dt.name,
            shape=shape,
            elements=int(r64.size),
            mismatches=int(r64.size),
            reason=reason,
            fused_name=fused_name,
        )

    f64 = np.concatenate([_f64(f).reshape(-1) for f in fused])
    exact = np.concatenate(
        [(np.asarray(r) == np.asarray(f)).reshape(-1) for r, f in zip(ref, fused, strict=True)]
    )
    ok = _pass_mask(r64, f64, use_rtol, use_atol, exact)
    finite = np.isfinite(r64) & np.isfinite(f64)
    nonfinite_mismatch = bool(np.any(~ok & ~finite))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.abs(f64[finite] - r64[finite])
        absr = np.abs(r64[finite])
        max_abs = float(np.max(diff, initial=0.0))
        mean_abs = float(np.mean(diff)) if diff.size else 0.0
        big = absr > use_atol
        max_rel = float(np.max(diff[big] / absr[big], initial=0.0))
    if nonfinite_mismatch:
        max_abs = max_rel = float("inf")

    top1: float | None = None
    if is_float_dtype(ref_dt) and len(shape) == 2 and shape[1] > 1:
        agree = [
            np.argmax(_f64(r), axis=1) == np.argmax(_f64(f), axis=1)
            for r, f in zip(ref, fused, strict=True)
        ]
        rows = np.concatenate(agree)
        top1 = float(np.mean(rows)) if rows.size else None

    mismatches = int(np.count_nonzero(~ok))
    return OutputMetrics(
        name=name,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        mean_abs_error=mean_abs,
        cosine_similarity=_cosine(r64, f64),
        top1_agreement=top1,
        min_atol=_min_atol(r64, f64, use_rtol, exact),
        rtol=use_rtol,
        atol=use_atol,
        passed=mismatches == 0,
        dtype=ref_dt.name,
        shape=shape,
        elements=int(r64.size),
        mismatches=mismatches,
        reason=_tolerance_reason(mismatches, int(r64.size), nonfinite_mismatch),
        fused_name=fused_name,
    )


def run_side(runner: Runner, feed: Mapping[str, np.ndarray], *, fused: bool) -> list[np.ndarray]:
    """Run one side; a runtime failure becomes a documented error.

    The original failing to run means the model itself is broken or beyond the runtime
    (``UnsupportedModelError``); the fused model failing where the original ran is a
    bnfuse bug (``FusionInvariantError``).
    """
    try:
        return runner.run(feed)
    except BnfuseError:
        raise
    except Exception as exc:
        first = first_line(exc)
        if fused:
            raise FusionInvariantError(
                f"the fused model fails to run where the original ran: {first}"
            ) from None
        raise UnsupportedModelError(f"the model fails to run: {first}") from None


def compare(
    ref: Runner,
    fused: Runner,
    feeds: list[dict[str, np.ndarray]],
    *,
    rtol: float | None,
    atol: float | None,
    input_source: str,
) -> Validation:
    """Run ``ref`` and ``fused`` on every feed and compare their outputs.

    Args:
        ref: runs the original model.
        fused: runs the fused model (same runtime, same settings).
        feeds: one ``{input name: array}`` per run (see :mod:`bnfuse.inputs`).
        rtol, atol: tolerance; ``None`` picks the dtype default (module docstring).
        input_source: where the feeds came from, for the report.

    Returns:
        A :class:`~bnfuse.result.Validation`; ``samples`` is the number of runs, ``runtime``
        the runner's ``runtime`` attribute (``"unknown"`` when it has none).

    Raises:
        UsageError: no feeds, or a negative tolerance.
        FusionInvariantError: the fused model has a different number of outputs.
    """
    if not feeds:
        raise UsageError("validation needs at least one sample")
    for label, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not (tol >= 0.0 and np.isfinite(tol)):
            raise UsageError(f"--{label} must be a finite number >= 0, got {tol}")
    ref_names = list(ref.output_names)
    fused_names = list(fused.output_names)
    if len(ref_names) != len(fused_names):
        raise FusionInvariantError(
            f"the fused model has {len(fused_names)} outputs, the original {len(ref_names)}",
            original=ref_names,
            fused=fused_names,
        )
    per_ref: list[list[np.ndarray]] = [[] for _ in ref_names]
    per_fused: list[list[np.ndarray]] = [[] for _ in ref_names]
    for feed in feeds:
        outs_r = run_side(ref, feed, fused=False)
        outs_f = run_side(fused, feed, fused=True)
        if len(outs_r) != len(ref_names) or len(outs_f) != len(ref_names):
            raise FusionInvariantError(
                f"a runner returned {len(outs_r)}/{len(outs_f)} outputs for "
                f"{len(ref_names)} output names"
            )
        for k, (r, f) in enumerate(zip(outs_r, outs_f, strict=True)):
            per_ref[k].append(np.asarray(r))
            per_fused[k].append(np.asarray(f))
    outputs = tuple(
        output_metrics(
            name,
            per_ref[k],
            per_fused[k],
            rtol=rtol,
            atol=atol,
            fused_name=fused_names[k] if fused_names[k] != name else "",
            compute_dtype=getattr(ref, "compute_dtype", None),
        )
        for k, name in enumerate(ref_names)
    )
    return Validation(
        passed=all(o.passed for o in outputs),
        samples=len(feeds),
        runtime=str(getattr(ref, "runtime", "unknown")),
        outputs=outputs,
        input_source=input_source,
    )
