"""Keras layers that are fixed element-wise affines at inference, read as one.

``BatchNormalization`` (inference: moving statistics), ``Normalization`` (after
``adapt()``, ``invert=False``: ``(x - mean) / max(sqrt(var), eps)``) and ``Rescaling``
(``x * scale + offset``) all compute ``z = s * x + t`` where ``s`` and ``t`` vary over
some axes of the input and are constant over the others. :func:`layer_affine` turns such
a layer into a flat :class:`~bnfuse.fold.Affine` and the axes it varies over:

* one axis (the usual BN over channels): ``s``, ``t`` have one entry per channel;
* several axes (Keras 2 ``BatchNormalization(axis=[1, 2])``, a per-position BN, a
  ``Normalization`` over several axes): entries in row-major order of those axes;
* no axis (a scalar ``Rescaling``): one entry, the same for every element.

The fold pass (:mod:`bnfuse.keras.fuse`) decides where such an affine can go; this module
only reads layers. Nothing here is framework code beyond attribute access.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnfuse.fold import Affine, bn_affine, check_affine, check_bn
from bnfuse.keras.compat import Flavor
from bnfuse.plan import flatten_affine
from bnfuse.reasons import Reason, tagged

__all__ = ["AFFINE_KINDS", "LayerAffine", "affine_kind", "flat_affine", "layer_affine"]

F64 = NDArray[np.float64]

#: Layer classes read as fixed affines (besides BN, forward folds only).
AFFINE_KINDS = ("BatchNormalization", "Normalization", "Rescaling")


@dataclass
class LayerAffine:
    """What :func:`layer_affine` read: the affine and where it varies, or why not."""

    aff: Affine | None = None
    axes: tuple[int, ...] = ()  # counted with the batch dim, ascending
    dims: tuple[int, ...] = ()  # sizes of the input at ``axes``
    rank: int | None = None
    reason: Reason | None = None


def affine_kind(fl: Flavor, layer: Any) -> str | None:
    """'BatchNormalization' (any BN, subclasses included), 'Normalization',
    'Rescaling', or None for a layer of no affine kind."""
    if fl.is_bn(layer):
        return "BatchNormalization"
    for name in AFFINE_KINDS[1:]:
        if type(layer) in fl.classes((name,)):
            return name
    return None


def _axes(raw: Any, rank: int) -> tuple[int, ...] | Reason:
    items = list(raw) if isinstance(raw, list | tuple) else [raw]
    out = []
    for a in items:
        if not isinstance(a, int | np.integer) or not -rank <= int(a) < rank:
            return tagged("axis-mismatch", f"axis {a} out of range for rank {rank}")
        out.append(int(a) % rank)
    return tuple(sorted(set(out)))


def _np(fl: Flavor, v: Any) -> F64:
    return np.asarray(fl.to_numpy(v), dtype=np.float64)


def _bn(fl: Flavor, layer: Any, out: LayerAffine, shape: tuple[int | None, ...]) -> None:
    axes = _axes(fl.bn_axis(layer), len(shape))
    if isinstance(axes, str):
        out.reason = axes.reworded(f"BN {axes}")
        return
    if 0 in axes:
        out.reason = tagged("axis-mismatch", "BN normalizes the batch axis")
        return
    out.axes = axes
    mean = _np(fl, layer.moving_mean).reshape(-1)
    var = _np(fl, layer.moving_variance).reshape(-1)
    gamma = _np(fl, layer.gamma).reshape(-1) if layer.scale else None
    beta = _np(fl, layer.beta).reshape(-1) if layer.center else None
    eps = fl.bn_epsilon(layer)
    bad = check_bn(mean, var, eps, gamma, beta)
    if bad:
        out.reason = bad
        return
    out.aff = bn_affine(mean, var, eps, gamma, beta)


def _broadcast_affine(
    s: F64, t: F64, shape: tuple[int | None, ...], out: LayerAffine, what: str
) -> None:
    """``s``, ``t`` broadcast against an input of ``shape`` (batch incl.): the axes where
    either varies, and their entries in row-major order."""
    rank = len(shape)
    s, t = np.broadcast_arrays(s, t)
    if s.ndim > rank:
        out.reason = tagged("axis-mismatch", f"{what} has more dimensions than its input")
        return
    full = (1,) * (rank - s.ndim) + s.shape
    s, t = s.reshape(full), t.reshape(full)
    axes = tuple(i for i, d in enumerate(full) if d != 1)
    if 0 in axes:
        out.reason = tagged("axis-mismatch", f"{what} varies over the batch axis")
        return
    out.axes = axes
    squeeze = tuple(i for i in range(rank) if i not in axes)
    out.aff = Affine(
        np.ascontiguousarray(s.squeeze(squeeze)).reshape(-1),
        np.ascontiguousarray(t.squeeze(squeeze)).reshape(-1),
    )


def _normalization(fl: Flavor, layer: Any, out: LayerAffine, shape: tuple[int | None, ...]) -> None:
    if getattr(layer, "invert", False):
        out.reason = tagged(
            "unsupported-layer", "Normalization with invert=True (not a forward affine)"
        )
        return
    mean = getattr(layer, "mean", None)
    var = getattr(layer, "variance", None)
    if mean is None or var is None:
        out.reason = tagged("not-constant", "Normalization is not built (no mean/variance)")
        return
    m, v = _np(fl, mean), _np(fl, var)
    eps = float(fl.module.backend.epsilon())
    s = 1.0 / np.maximum(np.sqrt(v), eps)
    _broadcast_affine(s, -m * s, shape, out, "Normalization")


def _rescaling(fl: Flavor, layer: Any, out: LayerAffine, shape: tuple[int | None, ...]) -> None:
    try:
        s = np.asarray(layer.scale, dtype=np.float64)
        t = np.asarray(layer.offset, dtype=np.float64)
    except (TypeError, ValueError):
        out.reason = tagged("not-constant", "Rescaling scale/offset are not constant numbers")
        return
    if (s.ndim or t.ndim) and getattr(layer, "data_format", "channels_last") == "channels_first":
        out.reason = tagged("unsupported-layer", "per-channel Rescaling with channels_first data")
        return
    _broadcast_affine(s, t, shape, out, "Rescaling")


def _dtype_reason(fl: Flavor, layer: Any) -> Reason | None:
    """A preprocessing layer casts its input to its compute dtype; folding it away would
    hand the next layer the uncast input."""
    try:
        tensor = layer.input
    except (AttributeError, ValueError, RuntimeError):
        return None
    got = fl.dtype(tensor)
    want = np.dtype(str(layer.compute_dtype))
    if got != want:
        return tagged("dtype", f"{type(layer).__name__} casts its {got.name} input to {want.name}")
    return None


def layer_affine(fl: Flavor, layer: Any, kind: str, shape: Any) -> LayerAffine:
    """The affine ``layer`` (of ``kind``) applies to an input of ``shape`` (batch incl.)."""
    out = LayerAffine()
    if shape is None:
        out.reason = tagged("axis-mismatch", f"{kind} input rank unknown")
        return out
    shape = tuple(shape)
    out.rank = len(shape)
    if kind == "BatchNormalization":
        _bn(fl, layer, out, shape)
    elif kind == "Normalization":
        _normalization(fl, layer, out, shape)
    else:
        _rescaling(fl, layer, out, shape)
    if out.reason is not None or out.aff is None:
        return out
    if kind != "BatchNormalization":
        bad = _dtype_reason(fl, layer)
        if bad:
            out.reason, out.aff = bad, None
            return out
        bad = check_affine(out.aff)
        if bad:
            out.reason, out.aff = bad, None
            return out
    dims = [shape[a] for a in out.axes]
    if any(d is None for d in dims):
        out.reason = tagged(
            "axis-mismatch", f"{kind} input size along axes {list(out.axes)} unknown"
        )
        out.aff = None
        return out
    out.dims = tuple(int(d) for d in dims if d is not None)
    if math.prod(out.dims) != out.aff.channels:
        out.reason = tagged(
            "axis-mismatch", f"{kind} has {out.aff.channels} parameters for axes {list(out.axes)}"
        )
        out.aff = None
    return out


def flat_affine(
    aff: Affine,
    features: tuple[int, ...],
    axes: tuple[int, ...],
    channels_first: bool,
    norm: str = "BatchNormalization",
) -> Affine | Reason:
    """The affine ``aff`` per feature that ``Flatten`` makes of an input of ``features``
    (the non-batch shape), from the planning core's :func:`~bnfuse.plan.flatten_affine`.

    ``aff`` varies over ``axes`` (counted with the batch axis, ascending; ``()``: a
    scalar), its entries numbered row-major over them: it is the constant of shape 1 off
    those axes. A channels_first Flatten moves the channel axis last first.
    """
    elem = None
    if axes:
        elem = (1, *(d if i + 1 in axes else 1 for i, d in enumerate(features)))
    perm = (*range(1, len(features)), 0) if channels_first and len(features) > 1 else None
    return flatten_affine(aff, features, axis=None, elem_shape=elem, norm=norm, perm=perm)
