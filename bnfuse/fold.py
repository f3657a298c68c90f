"""The fold math, shared by every backend. Imports numpy only.

Inference BatchNormalization is the per-channel affine ``z = s*y + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - s*mean``.

* Backward fold (linear layer, then the affine): scale the weight along its OUTPUT
  channels by ``s``; new bias ``s*b + t``.
* Forward fold (the affine, then a linear layer): scale the weight along its INPUT
  channels by ``s``; new bias ``b + W·t`` (sum over everything feeding each output).

Weights are described by *channel maps*: an integer array, broadcastable to the weight's
shape, that gives for every weight element the channel it belongs to. Any layout
(grouped convolutions, grouped transposed convolutions, depthwise kernels) is one
``channel_map`` call away, so the arithmetic below is written once.

Everything is computed in float64; :func:`round_to` rounds once to the target dtype and
reports overflow instead of producing ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnfuse.reasons import Reason, tagged

__all__ = [
    "Affine",
    "DtypeOverflowError",
    "Scaled",
    "bn_affine",
    "channel_map",
    "check_affine",
    "check_bn",
    "fold_backward",
    "fold_forward",
    "gemm_bias_backward",
    "gemm_bias_forward",
    "round_to",
    "separable_bias",
]

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class Affine:
    """A per-channel affine ``z = scale*x + shift`` (float64 vectors of equal length)."""

    scale: F64
    shift: F64

    @property
    def channels(self) -> int:
        """Number of channels."""
        return int(self.scale.shape[0])

    def then(self, other: Affine) -> Affine:
        """The affine that applies ``self`` first and ``other`` second."""
        return Affine(self.scale * other.scale, other.scale * self.shift + other.shift)

    @property
    def is_identity(self) -> bool:
        """True when the affine changes nothing."""
        return bool(np.all(self.scale == 1.0) and np.all(self.shift == 0.0))


def _vec(x: object, n: int, default: float) -> F64:
    if x is None:
        return np.full(n, default, dtype=np.float64)
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 1 and n != 1:
        return np.full(n, float(arr[0]), dtype=np.float64)
    return arr


def bn_affine(
    mean: object,
    var: object,
    eps: float,
    gamma: object | None = None,
    beta: object | None = None,
) -> Affine:
    """The inference BatchNormalization as an :class:`Affine` (float64).

    Missing ``gamma`` means 1 (Keras ``scale=False``), missing ``beta`` means 0
    (``center=False``). Call :func:`check_affine` on the result, or :func:`check_bn`
    on the inputs, before folding.
    """
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    n = m.shape[0]
    v = _vec(var, n, 1.0)
    g = _vec(gamma, n, 1.0)
    b = _vec(beta, n, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = g / np.sqrt(v + float(eps))
        t = b - s * m
    return Affine(s, t)


def check_bn(
    mean: object, var: object, eps: float, gamma: object | None = None, beta: object | None = None
) -> Reason | None:
    """None when the BN statistics fold to a finite affine, else a user-readable reason."""
    found = checked_bn_affine(mean, var, eps, gamma, beta)
    return found if isinstance(found, str) else None


def checked_bn_affine(
    mean: object, var: object, eps: float, gamma: object | None = None, beta: object | None = None
) -> Affine | Reason:
    """:func:`bn_affine` after the checks of :func:`check_bn`: the affine, or why the
    statistics do not fold to a finite one."""
    fast = _finite_bn_affine(mean, var, eps, gamma, beta)
    if fast is not None:
        return fast
    arrays = {"mean": mean, "variance": var, "gamma": gamma, "beta": beta}
    given = {
        label: np.asarray(arr, dtype=np.float64).reshape(-1)
        for label, arr in arrays.items()
        if arr is not None
    }
    if not np.isfinite(np.concatenate(list(given.values()))).all():  # one pass, then which
        for label, arr in given.items():
            if not np.isfinite(arr).all():
                return tagged("unsafe-statistics", f"non-finite BN {label} (NaN or Inf)")
    if not math.isfinite(eps):
        return tagged("unsafe-statistics", "non-finite BN epsilon")
    if (given["variance"] + float(eps) <= 0).any():
        return tagged("unsafe-statistics", "variance + epsilon <= 0: BN is undefined")
    aff = bn_affine(mean, var, eps, gamma, beta)
    return check_affine(aff) or aff


def _finite_bn_affine(
    mean: object, var: object, eps: float, gamma: object | None, beta: object | None
) -> Affine | None:
    """The affine when every check of :func:`checked_bn_affine` passes (one pass over
    the statistics for finiteness), else None: the caller then finds the reason."""
    if not math.isfinite(eps):
        return None
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    given = [
        np.asarray(x, dtype=np.float64).reshape(-1) for x in (mean, gamma, beta) if x is not None
    ]
    if not (np.isfinite(np.concatenate([v, *given])).all() and (v + float(eps) > 0).all()):
        return None
    aff = bn_affine(mean, var, eps, gamma, beta)
    return None if check_affine(aff) else aff


def check_affine(aff: Affine) -> Reason | None:
    """None when the affine is finite, else a user-readable reason."""
    if not (np.isfinite(aff.scale).all() and np.isfinite(aff.shift).all()):
        return tagged("unsafe-statistics", "BN folds to a non-finite scale or shift")
    return None


def channel_map(
    shape: Sequence[int],
    axes: Sequence[int],
    view: Sequence[int] | None = None,
) -> NDArray[np.int64]:
    """Channel index of every element of a weight of ``shape``.

    The weight is viewed with shape ``view`` (default: ``shape``); the channel of an
    element is the row-major ravel of its indices along ``axes`` of that view. Examples::

        ONNX Conv  W[Cout, Cin/g, k...]: output channels  axes=(0,)
        Keras Dense W[in, out]:          output channels  axes=(1,)
        Keras DepthwiseConv (k..., in, mult): out channel i*mult+m  axes=(-2, -1)
        ONNX ConvTranspose grouped W[Cin, Cout/g, k...]: view [g, Cin/g, Cout/g, k...],
            output channel gi*(Cout/g)+j  axes=(0, 2)

    The result is broadcastable to ``shape`` (materialised only when ``view`` differs).
    ``channel_map(view, axes)`` is the small form, broadcastable to ``view``: the fold
    functions take it with their ``view`` argument.
    """
    v = tuple(int(d) for d in (view if view is not None else shape))
    if math.prod(v) != math.prod(int(d) for d in shape):
        raise ValueError(f"view {v} does not match weight shape {tuple(shape)}")
    nd = len(v)
    ax = sorted(a % nd for a in axes)
    if len(set(ax)) != len(ax):
        raise ValueError("channel axes repeat")
    sub = [v[a] for a in ax]
    idx = np.arange(math.prod(sub), dtype=np.int64).reshape(sub)
    bshape = [1] * nd
    for a in ax:
        bshape[a] = v[a]
    idx = idx.reshape(bshape)
    if tuple(v) == tuple(shape):
        return idx
    return np.broadcast_to(idx, v).reshape(tuple(shape))


def _gather(vec: F64, cmap: NDArray[np.int64]) -> F64:
    return vec[cmap]


_NATIVE_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})

#: bytes of output :meth:`Scaled.blocks` computes at a time
BLOCK_BYTES = 1 << 20


class Scaled:
    """``weight * factor`` computed in float64 and rounded once to ``dtype`` - not yet.

    What :func:`fold_backward` / :func:`fold_forward` return for the weight when asked
    for ``lazy`` results and the product provably cannot overflow ``dtype``: a writer
    then computes it block by block into one reused buffer while writing it out
    (:meth:`blocks`), so a fold of a large model neither holds a second copy of its
    weights nor pays for fresh memory. ``numpy.asarray(scaled)`` computes it whole.

    ``weight`` and ``factor`` broadcast together; the product has their broadcast shape,
    or ``shape`` (a reshape of it: a fold may compute in a view of the weight, e.g. a
    grouped ConvTranspose split into its groups, where the factor needs no full-size
    copy).
    """

    def __init__(
        self,
        weight: NDArray[np.generic],
        factor: F64,
        dtype: np.dtype[Any],
        shape: Sequence[int] | None = None,
    ) -> None:
        computed = np.broadcast_shapes(weight.shape, factor.shape)
        self.weight = np.broadcast_to(weight, computed)
        self.factor = np.broadcast_to(factor, computed)
        self.dtype = np.dtype(dtype)
        self.shape: tuple[int, ...] = (
            tuple(int(d) for d in shape) if shape is not None else computed
        )
        if math.prod(self.shape) != math.prod(computed):
            raise ValueError(f"shape {self.shape} is not a reshape of {computed}")

    @property
    def nbytes(self) -> int:
        """Size of the product in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def _into(self, out: NDArray[Any], index: tuple[Any, ...]) -> None:
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(
                self.weight[index],
                self.factor[index],
                out=out,
                dtype=np.float64,
                casting="same_kind",
            )

    def __array__(self, dtype: Any = None, copy: Any = None) -> NDArray[Any]:
        out = np.empty(self.weight.shape, dtype=self.dtype)
        if out.ndim == 0:
            out[...] = np.multiply(self.weight, self.factor, dtype=np.float64)
        else:
            self._into(out, (Ellipsis,))
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype)

    def blocks(self, reuse: bool = True) -> Iterator[NDArray[Any]]:
        """The product in C order, as consecutive C-contiguous blocks (about
        :data:`BLOCK_BYTES` each: runs of rows along the first axis whose rows are no
        larger, index by index over the axes before it). With ``reuse`` every block is
        the same buffer, overwritten by the next: use each before asking for the next."""
        cs = self.weight.shape
        if len(cs) < 2 or self.nbytes <= BLOCK_BYTES:
            yield np.asarray(self)
            return
        item = self.dtype.itemsize
        k = 0  # the axis stepped through in runs; axes before it go index by index
        while k < len(cs) - 1 and math.prod(cs[k + 1 :]) * item > BLOCK_BYTES:
            k += 1
        tail = tuple(cs[k + 1 :])
        step = max(1, BLOCK_BYTES // max(1, math.prod(tail) * item))
        buf = np.empty((min(step, cs[k]), *tail), dtype=self.dtype) if reuse else None
        for outer in np.ndindex(*cs[:k]):
            for lo in range(0, cs[k], step):
                hi = min(lo + step, cs[k])
                out = buf[: hi - lo] if buf is not None else np.empty((hi - lo, *tail), self.dtype)
                self._into(out, (*outer, slice(lo, hi)))
                yield out


def _cannot_overflow(weight: NDArray[np.generic], factor: F64, dt: np.dtype[Any]) -> bool:
    """True when every ``weight * factor`` is provably finite after rounding to ``dt``
    (or non-finite only because the weight already is, which rounding keeps as it is)."""
    if factor.size == 0 or weight.size == 0:
        return True
    with np.errstate(invalid="ignore"):
        smax = float(np.max(np.abs(factor)))
    if not math.isfinite(smax):
        return False
    w_dt = weight.dtype
    if smax <= 1.0 and w_dt in _NATIVE_FLOATS and w_dt.itemsize <= dt.itemsize:
        return True  # |w*s| <= |w|, which a type of no wider range than ``dt`` holds
    wmax = max(abs(float(np.max(weight))), abs(float(np.min(weight))))  # no temporaries
    limit = float(np.finfo(dt).max) * (1 - 2.0**-10)  # margin for the rounding
    return math.isfinite(wmax) and wmax * smax <= limit


def _scaled(
    weight: NDArray[np.generic],
    factor: F64,
    out_dtype: Any,
    lazy: bool = False,
    shape: Sequence[int] | None = None,
) -> NDArray[Any] | Scaled:
    """``weight * factor`` computed in float64; rounded once to ``out_dtype`` if given.

    Rounding inside the multiply (numpy computes each product in float64 and casts it
    into the output) gives the same values as ``round_to(weight * factor, out_dtype)``
    without materializing the float64 product: the common large-weight path. With
    ``lazy``, a product that cannot overflow is returned as a :class:`Scaled`.
    """
    dt = np.dtype(out_dtype) if out_dtype is not None else None
    final = tuple(shape) if shape is not None else np.broadcast_shapes(weight.shape, factor.shape)
    if dt is None or dt not in _NATIVE_FLOATS:
        w64 = np.multiply(weight, factor, dtype=np.float64)
        return (w64 if dt is None else round_to(w64, dt)).reshape(final)
    if lazy and _cannot_overflow(weight, factor, dt):
        return Scaled(weight, factor, dt, final)
    out = np.empty(np.broadcast_shapes(weight.shape, factor.shape), dtype=dt)
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(weight, factor, out=out, dtype=np.float64, casting="same_kind")
    if not np.isfinite(out).all():
        round_to(np.multiply(weight, factor, dtype=np.float64), dt)  # raises on overflow
    return out.reshape(final)


def fold_backward(
    weight: NDArray[np.generic],
    bias: NDArray[np.generic] | None,
    aff: Affine,
    out_map: NDArray[np.int64],
    weight_dtype: Any = None,
    lazy: bool = False,
    view: Sequence[int] | None = None,
) -> tuple[Any, F64]:
    """Fold ``aff`` applied to the layer's output into the layer.

    ``out_map`` is the :func:`channel_map` of the weight's output channels, broadcastable
    to the weight, or to ``view`` when given (a reshape of the weight in which the map
    needs no full-size copy, see :func:`channel_map`). Returns the new weight (same
    shape as ``weight``) and the new bias (one value per channel), computed in float64.
    The weight is returned in float64, or rounded once to ``weight_dtype`` when given
    (raising :class:`OverflowError` like :func:`round_to`); with ``lazy`` as a
    :class:`Scaled` where it provably cannot overflow.
    """
    b = np.zeros(aff.channels) if bias is None else np.asarray(bias, dtype=np.float64)
    b = np.broadcast_to(b.reshape(-1), (aff.channels,))
    shape = weight.shape if view is not None else None
    w_view = weight.reshape(tuple(view)) if view is not None else weight
    w = _scaled(w_view, _gather(aff.scale, out_map), weight_dtype, lazy, shape)
    return w, aff.scale * b + aff.shift


def fold_forward(
    weight: NDArray[np.generic],
    bias: NDArray[np.generic] | None,
    aff: Affine,
    in_map: NDArray[np.int64],
    out_map: NDArray[np.int64],
    out_channels: int,
    weight_dtype: Any = None,
    lazy: bool = False,
    view: Sequence[int] | None = None,
) -> tuple[Any, F64]:
    """Fold ``aff`` applied to the layer's input into the layer (computed in float64).

    ``in_map``/``out_map`` give every weight element's input and output channel
    (broadcastable to the weight, or to its reshape ``view``: see :func:`fold_backward`). The new
    bias is ``b[o] + sum(W[e] * shift[in(e)] for e with out(e) == o)``; exact only when the
    layer applies no zero padding to its input (the caller checks that). The weight is
    float64, or rounded once to ``weight_dtype`` when given, or :class:`Scaled` with
    ``lazy`` (see :func:`fold_backward`).
    """
    b = np.zeros(out_channels) if bias is None else np.asarray(bias, dtype=np.float64)
    b = np.broadcast_to(b.reshape(-1), (out_channels,)).copy()
    shape = weight.shape if view is not None else None
    w_view = weight.reshape(tuple(view)) if view is not None else weight
    b += _weighted_sums(w_view, _gather(aff.shift, in_map), out_map, out_channels)
    return _scaled(w_view, _gather(aff.scale, in_map), weight_dtype, lazy, shape), b


def _weighted_sums(
    weight: NDArray[np.generic], factor: F64, out_map: NDArray[np.int64], out_channels: int
) -> F64:
    """``sum(weight[e] * factor[e] for every e with out_map[e] == o)`` for each ``o``.

    float64 throughout (the weight is widened element by element, exactly), computed in
    blocks of rows of about :data:`BLOCK_BYTES` of float64 products: no product array
    the size of the weight (fresh memory to fault in, the costly part on a large layer).
    """
    nd = weight.ndim

    def lift(a: NDArray[Any]) -> NDArray[Any]:  # leading 1-dims up to the weight's rank
        return a.reshape((1,) * (nd - a.ndim) + a.shape)

    def counts(index: NDArray[Any], weights: F64) -> F64:  # float64 with weights
        return np.asarray(
            np.bincount(index, weights=weights, minlength=out_channels), dtype=np.float64
        )

    if nd == 0:
        product = np.multiply(weight, factor, dtype=np.float64)
        return counts(np.asarray(out_map).reshape(-1), product.reshape(-1))
    fac, om = lift(np.asarray(factor)), lift(np.asarray(out_map))
    rows = weight.shape[0]
    step = max(1, BLOCK_BYTES // (8 * max(1, math.prod(weight.shape[1:]))))
    total = np.zeros(out_channels)
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        f = fac[lo:hi] if fac.shape[0] != 1 else fac
        o = om[lo:hi] if om.shape[0] != 1 else om
        contrib = np.multiply(weight[lo:hi], f, dtype=np.float64)
        # out_map is constant along the axes it broadcasts over: sum those first
        axes = tuple(i for i, d in enumerate(o.shape) if d == 1 and contrib.shape[i] != 1)
        if axes:
            contrib = contrib.sum(axis=axes, keepdims=True)
        sums = counts(np.broadcast_to(o, contrib.shape).ravel(), contrib.ravel())
        if len(sums) > len(total):  # an out_map beyond out_channels (bincount grows)
            sums[: len(total)] += total
            total = sums
        else:
            total[: len(sums)] += sums
    return total


def gemm_bias_backward(c: NDArray[np.generic] | None, beta: float, aff: Affine) -> F64:
    """The new ``C`` of ``alpha*A'B' + beta*C`` followed by ``aff``, with ``beta`` then 1.

    ``aff(alpha*A'B' + beta*C) == alpha*A'(B' s) + (beta*C*s + t)``: the B columns scale
    like any output channel (:func:`fold_backward`, no bias), and ``C`` (any shape that
    broadcasts to the output, kept) becomes ``beta*C*s + t``, or ``t`` without one.
    """
    if c is None:
        return aff.shift
    return np.asarray(beta * np.asarray(c, dtype=np.float64) * aff.scale + aff.shift)


def gemm_bias_forward(
    c: NDArray[np.generic] | None, alpha: float, beta: float, shifted: F64
) -> F64 | None:
    """The new ``C`` of ``alpha*(A s + t)B + beta*C``, with ``beta`` then 1; None when the
    Gemm needs none (it had no ``C`` and the shift adds nothing).

    ``shifted`` is ``t·B`` per output (the bias :func:`fold_forward` returns for no
    bias): ``alpha*(A s)B + (beta*C + alpha*t·B)``.
    """
    if c is None:
        c2 = alpha * shifted
        return np.asarray(c2) if np.any(c2 != 0) else None
    return np.asarray(beta * np.asarray(c, dtype=np.float64) + alpha * shifted)


class DtypeOverflowError(OverflowError):
    """Folded values that a finite ``dtype`` (its name) cannot hold: the fold is refused."""

    def __init__(self, dtype: str) -> None:
        super().__init__(f"folded values overflow {dtype}")
        self.dtype = dtype


def separable_bias(
    pointwise: NDArray[np.generic], bias: NDArray[np.generic] | None, shift: F64
) -> F64:
    """The bias of a separable convolution whose depthwise step gained the per-channel
    output ``shift`` (a forward fold into its depthwise kernel): the shift passes through
    the pointwise kernel ``(1..., in*mult, out)`` into the bias, ``b + P.shift``, float64."""
    out = int(pointwise.shape[-1])
    through = Affine(np.ones(int(pointwise.shape[-2])), np.asarray(shift, dtype=np.float64))
    return fold_forward(
        pointwise,
        bias,
        through,
        channel_map(pointwise.shape, (-2,)),
        channel_map(pointwise.shape, (-1,)),
        out,
    )[1]


def round_to(arr: NDArray[np.generic], dtype: Any) -> NDArray[Any]:
    """Round a float64 array once to ``dtype`` (numpy float types or ml_dtypes' bfloat16).

    Raises :class:`DtypeOverflowError` (an :class:`OverflowError`) when a finite value
    becomes infinite (fp16 and bf16 overflow silently to ``inf`` otherwise).
    """
    dt = np.dtype(dtype)
    if isinstance(arr, np.ndarray) and arr.dtype == dt:
        return arr  # already of that type (e.g. rounded inside the fold): nothing to round
    a64 = np.asarray(arr, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if dt.name == "bfloat16":
            # ml_dtypes casts float64 -> float32 -> bfloat16 (two roundings); round once here
            # to bfloat16's 8 significant bits, after which the casts are exact.
            out = _round_bf16_grid(a64).astype(np.float32).astype(dt)
        else:
            out = a64.astype(dt)
    if dt == np.float64 or bool(np.isfinite(out).all()):
        return out  # nothing became infinite (the common case: one cheap pass)
    if np.any(np.isinf(out.astype(np.float64)) & np.isfinite(a64)):
        raise DtypeOverflowError(out.dtype.name)
    return out


_BF16_MAX = 3.3895313892515355e38


def _round_bf16_grid(a64: F64) -> F64:
    """Round float64 values to the nearest bfloat16 value (ties to even), as float64."""
    mant, exp = np.frexp(a64)  # a64 = mant * 2**exp, 0.5 <= |mant| < 1
    normal = np.ldexp(np.rint(np.ldexp(mant, 8)), exp - 8)
    quantum = 2.0**-133  # bfloat16 subnormal spacing
    sub = np.rint(a64 / quantum) * quantum
    out = np.where(np.abs(a64) < 2.0**-126, sub, normal)
    out = np.where(np.isfinite(a64), out, a64)
    return np.where(np.abs(out) > _BF16_MAX, np.copysign(np.inf, out), out)
