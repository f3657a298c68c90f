"""BN statistics against data, and their re-estimation: the framework-free math (numpy only).

Moments
-------
A BN's input is reduced per channel: over every axis except the BN's channel axis (ONNX:
axis 1; Keras: ``layer.axis``), or per element over several kept axes for a BN with a list
``axis`` (Keras 2). :class:`Moments` holds, per channel, the count, the mean and ``M2``
(the sum of squared deviations from the mean) in float64. Two :class:`Moments` merge
exactly (Chan, Golub and LeVeque's parallel update), so statistics streamed batch by batch
equal those of one batch holding everything, to float64 rounding, while memory stays one
vector per BN whatever the number of samples.

The variance is the *population* (biased) variance ``M2 / n``: it is what a BN divides by
when it normalizes a batch in training (Keras and PyTorch both normalize with the biased
variance), so a BN recalibrated to it maps the calibration data to exactly zero mean and
unit variance per channel before γ and β. (PyTorch's running variance uses ``n - 1``; over
the thousands of values per channel a calibration set gives, the two differ by ``1/n``.)

Comparison and flags
--------------------
For the data's per-channel mean ``m`` and variance ``v`` against the moving mean ``μ`` and
variance ``σ²`` (with the BN's ε):

* ``mean_shift = max_c |m − μ| / sqrt(σ² + ε)``: how far the data's mean is from the one
  the BN subtracts, in the BN's own standard deviations;
* ``var_ratio = max_c max((v + ε)/(σ² + ε), (σ² + ε)/(v + ε))``: ≥ 1, the factor by
  which the BN's scale is wrong (ε keeps dead channels, 0 against 0, at 1).

Flags, worst first (:data:`FLAG_ORDER`):

* ``invalid``: non-finite statistics (NaN/Inf) in the model;
* ``default``: the statistics are exactly the initial values (mean 0, variance 1, γ 1,
  β 0 where present): the BN was never updated;
* ``drift``: data given, and ``mean_shift > max(0.5, 4/sqrt(n))`` or
  ``var_ratio > max(2, exp(4·sqrt(2/(n−1))))`` for ``n`` values per channel. The floors
  (half a standard deviation; a factor 2 in variance) are what matters for deployment;
  the ``n`` terms are four standard errors of a sample mean and of a log sample variance,
  so that a BN whose statistics were computed from (a sample like) the same data is
  ``ok`` even for a handful of values;
* ``tiny-variance``: some channel's scale ``|γ|/sqrt(σ² + ε)`` is at least
  :data:`SCALE_LIMIT` (100): folding multiplies that channel's weights by that much;
* ``ok``: none of the above;
* ``no-stats``: a BN in disguise (a constant ``Mul``/``Add`` affine) has no statistics;
* ``not-checked``: a BN bnfuse could not run to (inside a subgraph, a nested model, a
  shared layer) or whose statistics are not constants.

:data:`WIDENING_LIMIT` (10): a fold whose max |W'| / max |W| or whose spread of the
per-channel scales (max |s| / min |s|) exceeds it is flagged: per-tensor int8 quantization
then spends its range on a few channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from bnfuse.errors import UsageError

__all__ = [
    "FLAG_ORDER",
    "MEAN_SHIFT_LIMIT",
    "MIN_VALUES",
    "SCALE_LIMIT",
    "VAR_RATIO_LIMIT",
    "WIDENING_LIMIT",
    "Comparison",
    "Moments",
    "Site",
    "compare",
    "is_default",
    "limits",
    "max_scale",
    "weight_flag",
    "widening",
]

F64 = NDArray[np.float64]

MEAN_SHIFT_LIMIT = 0.5
VAR_RATIO_LIMIT = 2.0
SCALE_LIMIT = 100.0
WIDENING_LIMIT = 10.0
#: fewest values per channel a variance can be estimated from
MIN_VALUES = 2

FLAG_ORDER = ("invalid", "default", "drift", "tiny-variance", "ok", "no-stats", "not-checked")


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), float64.

    ``mean`` and ``m2`` have the shape of the kept axes (one value per channel).
    """

    count: int
    mean: F64
    m2: F64

    @classmethod
    def of(cls, x: NDArray[np.generic], keep: Sequence[int]) -> Moments:
        """Moments of ``x`` over every axis not in ``keep`` (axes of ``x``, may be negative)."""
        arr = np.asarray(x)
        kept = tuple(sorted(int(a) % arr.ndim for a in keep))
        if len(set(kept)) != len(kept):
            raise ValueError(f"repeated axes in {tuple(keep)}")
        moved = np.moveaxis(arr, kept, tuple(range(arr.ndim - len(kept), arr.ndim)))
        shape = moved.shape[arr.ndim - len(kept) :]
        flat = moved.reshape(-1, math.prod(shape)).astype(np.float64)  # a copy: x is kept
        n = flat.shape[0]
        if n == 0:
            zero = np.zeros(shape, dtype=np.float64)
            return cls(0, zero, zero.copy())
        mean = flat.mean(axis=0)
        flat -= mean  # two passes: M2 from deviations, not from E[x²] − E[x]²
        m2 = np.einsum("ij,ij->j", flat, flat)
        return cls(n, mean.reshape(shape), m2.reshape(shape))

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of values together (exact up to float64 rounding)."""
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"channel shapes differ: {self.mean.shape} and {other.mean.shape}")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> F64:
        """Population (biased) variance ``M2 / n`` (see the module docstring for why)."""
        if self.count == 0:
            return np.full(self.mean.shape, np.nan)
        return np.maximum(self.m2 / self.count, 0.0)


def _flat(x: object, n: int, default: float) -> F64:
    if x is None:
        return np.full(n, default, dtype=np.float64)
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    return np.full(n, float(arr[0])) if arr.size == 1 and n != 1 else arr


def is_default(mean: object, var: object, gamma: object | None, beta: object | None) -> bool:
    """True when the statistics are exactly the initial ones: mean 0, variance 1, γ 1, β 0
    (absent γ/β count as their defaults)."""
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    n = m.size
    return bool(
        n > 0
        and np.all(m == 0.0)
        and np.all(_flat(var, n, 1.0) == 1.0)
        and np.all(_flat(gamma, n, 1.0) == 1.0)
        and np.all(_flat(beta, n, 0.0) == 0.0)
    )


def max_scale(var: object, eps: float, gamma: object | None = None) -> float:
    """``max_c |γ| / sqrt(σ² + ε)``: the largest factor folding multiplies weights by."""
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    g = _flat(gamma, v.size, 1.0)
    if v.size == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.abs(g) / np.sqrt(v + float(eps))
    return float(np.max(s)) if np.isfinite(s).all() else float("inf")


def weight_flag(
    mean: object, var: object, eps: float, gamma: object | None = None, beta: object | None = None
) -> tuple[str, str]:
    """``(flag, note)`` from the statistics alone: ``invalid``, ``default``,
    ``tiny-variance`` or ``ok``."""
    arrays = [
        np.asarray(a, dtype=np.float64).reshape(-1)
        for a in (mean, var, gamma, beta)
        if a is not None
    ]
    if not all(np.isfinite(a).all() for a in arrays) or not math.isfinite(eps):
        return "invalid", "non-finite statistics (NaN or Inf)"
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    if (v + float(eps) <= 0).any():
        return "invalid", "variance + epsilon <= 0"
    if is_default(mean, var, gamma, beta):
        return "default", "statistics are the initial values (mean 0, variance 1): never updated"
    s = max_scale(var, eps, gamma)
    if s >= SCALE_LIMIT:
        return "tiny-variance", f"folding multiplies weights by up to {s:.3g}"
    return "ok", ""


def limits(values: int) -> tuple[float, float]:
    """``(mean_shift limit, var_ratio limit)`` for ``values`` per channel (module docstring)."""
    n = max(int(values), 2)
    return (
        max(MEAN_SHIFT_LIMIT, 4.0 / math.sqrt(n)),
        max(VAR_RATIO_LIMIT, math.exp(4.0 * math.sqrt(2.0 / (n - 1)))),
    )


@dataclass(frozen=True)
class Comparison:
    """The data's statistics against a BN's moving statistics."""

    mean_shift: float
    var_ratio: float
    flag: str
    note: str


def compare(
    data: Moments,
    mean: object,
    var: object,
    eps: float,
    gamma: object | None = None,
    beta: object | None = None,
) -> Comparison:
    """Compare ``data`` with the moving statistics and flag the BN (module docstring).

    Raises:
        UsageError: fewer than :data:`MIN_VALUES` values per channel.
    """
    if data.count < MIN_VALUES:
        raise UsageError(
            f"--inputs: too few samples for BN statistics ({data.count} value(s) per "
            f"channel; at least {MIN_VALUES} needed)"
        )
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    dm = data.mean.reshape(-1)
    dv = data.var.reshape(-1)
    if dm.shape != m.shape:
        raise ValueError(f"{dm.size} data channels against {m.size} moving statistics")
    flag, note = weight_flag(mean, var, eps, gamma, beta)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shift = np.abs(dm - m) / np.sqrt(v + eps)
        ratio = (dv + eps) / (v + eps)
        ratio = np.maximum(ratio, 1.0 / ratio)
    mean_shift = float(np.max(shift)) if np.isfinite(shift).all() else float("inf")
    var_ratio = float(np.max(ratio)) if np.isfinite(ratio).all() else float("inf")
    lim_m, lim_v = limits(data.count)
    drift = [
        f"mean off by {mean_shift:.3g} std (limit {lim_m:.3g})" if mean_shift > lim_m else "",
        f"variance off by {var_ratio:.3g}x (limit {lim_v:.3g}x)" if var_ratio > lim_v else "",
    ]
    drift_note = "; ".join(d for d in drift if d)
    if drift_note and flag in ("ok", "tiny-variance"):
        note = "; ".join(x for x in (drift_note, note) if x)
        flag = "drift"
    elif drift_note:
        note = f"{note}; {drift_note}"
    elif flag == "default":
        note += "; the data agree with them"
    return Comparison(mean_shift, var_ratio, flag, note)


def widening(
    before: Sequence[NDArray[np.generic]], after: Sequence[NDArray[np.generic]]
) -> tuple[float | None, float | None]:
    """``(max|W'| / max|W|, max|s| / min|s|)`` of a fold that turned the arrays ``before``
    into ``after`` (same shapes), the scales ``s = W'/W`` read element-wise where ``W != 0``.

    None where it cannot be told (all-zero weights). The spread is ``inf`` when some
    channel was scaled by 0.
    """
    wmax = max((float(np.max(np.abs(w))) for w in before if np.size(w)), default=0.0)
    new = max((float(np.max(np.abs(w))) for w in after if np.size(w)), default=0.0)
    ratio = new / wmax if wmax > 0 and math.isfinite(wmax) else None
    lo, hi = math.inf, 0.0
    for w, w2 in zip(before, after, strict=True):
        a = np.asarray(w, dtype=np.float64)
        nz = a != 0
        if not nz.any():
            continue
        s = np.abs(np.asarray(w2, dtype=np.float64)[nz] / a[nz])
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    if hi == 0.0 and lo == math.inf:
        return ratio, None
    spread = hi / lo if lo > 0 else math.inf
    return ratio, spread


@dataclass
class Site:
    """One BN a collector can run to. ``keep``: the axes of its input that are channels
    (reduced over all others); ``reason``: why it cannot be checked ("" when it can)."""

    name: str
    keep: tuple[int, ...]
    channels: int
    eps: float
    mean: np.ndarray | None
    var: np.ndarray | None
    gamma: np.ndarray | None
    beta: np.ndarray | None
    depth: int
    reason: str = ""
    scope: str = ""
