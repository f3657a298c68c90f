"""The planning core: how a linear layer holds its channels, and whether and how a
per-channel affine folds into it. Backend-neutral: numpy, :mod:`bnfuse.fold`,
:mod:`bnfuse.reasons` and :mod:`bnfuse.result` only (no ONNX, no Keras).

A backend describes its layer as a :class:`Layout` and asks :func:`plan_backward` (the
affine comes after the layer) or :func:`plan_forward` (the affine comes before it). Each
returns a plan, or a :class:`~bnfuse.reasons.Reason` (a refusal sentence tagged with its
code). A plan's ``fold`` gathers nothing itself: the backend reads the weight and bias,
calls it, and writes the results back. The numbers are computed in :mod:`bnfuse.fold`.

Layout fields, per weight layout (from the design notes; get these wrong and the result
is silently wrong, as several tools shipped for grouped ConvTranspose):

=============================  ==========================  ==========  ========  ======  ==========
layer                          weight shape                out_axes    in_axes   groups  transposed
=============================  ==========================  ==========  ========  ======  ==========
ONNX Conv                      [C_out, C_in/g, k...]       (0,)        (1,)      g       no
ONNX ConvTranspose             [C_in, C_out/g, k...]       (1,)        (0,)      g       yes
ONNX Gemm, transB=0            B [K, N]                    (1,)        (0,)      1       no
ONNX Gemm, transB=1            B [N, K]                    (0,)        (1,)      1       no
ONNX MatMul (constant B)       [K, N]                      (1,)        (0,)      1       no
Keras Dense                    (in, out)                   (1,)        (0,)      1       no
Keras ConvND                   (k..., in/g, out)           (-1,)       (-2,)     g       no
Keras DepthwiseConvND          (k..., in, mult)            (-2, -1)    (-2,)     1       no
Keras SeparableConvND          depthwise (k..., in, mult)  as Depthwise (forward)
                               pointwise (1..., in*m, out) as ConvND (backward)
Keras ConvNDTranspose          (k..., out, in)             (-2,)       (-1,)     1       yes
=============================  ==========================  ==========  ========  ======  ==========

* ``out_axes`` / ``in_axes``: the axes whose indices, raveled in row-major order, give
  an element's output / input channel (Keras depthwise: output channel ``i*mult + m``).
* ``groups``: with ``g > 1`` one channel axis counts the channels of the whole layer and
  the other the channels *within the element's group*: a convolution's input axis
  (channel ``gi*(C_in/g) + j``, ``gi`` the group of the element's output channel), a
  transposed convolution's output axis (``gi*(C_out/g) + j``, ``gi`` the group of its
  input channel). Grouped layouts name one axis each.
* ``transposed``: a transposed convolution. Its border outputs sum fewer kernel taps, so
  a shift before it cannot become a bias (only a pure scale folds forward).
* ``pads_input``: the layer pads its input with zeros (for the input shape it gets): a
  shift before it would reach the borders in the fused layer and not in the original.
* ``dense``: a matrix product over features (Dense, Gemm, MatMul): what a Flatten in
  front of it produces can be folded after :func:`flatten_affine` expands the affine.

Identities (``z = s*x + t`` per channel, see :mod:`bnfuse.fold`): backward
``A(L(x)) = L'(x)`` scales the output channels by ``s``, bias ``s*b + t``; forward
``L(A(x)) = L'(x)`` scales the input channels by ``s``, bias ``b + W.t``, exact when
the layer does not pad its input and is not transposed, or when ``t == 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnfuse import fold
from bnfuse.fold import Affine, channel_map, round_to
from bnfuse.reasons import PADDING, TRANSPOSE_SHIFT, Reason, tagged
from bnfuse.result import Direction, Fold

__all__ = [
    "BackwardPlan",
    "ForwardPlan",
    "Layout",
    "flatten_affine",
    "fold_record",
    "plan_backward",
    "plan_forward",
]

Maps = tuple[NDArray[np.int64], NDArray[np.int64] | None, tuple[int, ...] | None]


@dataclass(frozen=True)
class Layout:
    """How a linear layer's weight holds its channels (see the module's table)."""

    shape: tuple[int, ...]
    out_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    groups: int = 1
    transposed: bool = False
    pads_input: bool = False
    dense: bool = False

    def _size(self, axes: tuple[int, ...]) -> int:
        return math.prod(int(self.shape[a]) for a in axes)

    @property
    def out_channels(self) -> int:
        """The layer's output channels (all groups)."""
        n = self._size(self.out_axes)
        return n * self.groups if self.transposed else n

    @property
    def in_channels(self) -> int:
        """The layer's input channels (all groups)."""
        n = self._size(self.in_axes)
        return n if self.transposed else n * self.groups

    @property
    def _full_axis(self) -> int:
        """The channel axis that counts the whole layer's channels (grouped layouts)."""
        return (self.in_axes if self.transposed else self.out_axes)[0]

    @property
    def _group_axis(self) -> int:
        """The channel axis that counts channels within a group (grouped layouts)."""
        return (self.out_axes if self.transposed else self.in_axes)[0]

    def _view(self) -> tuple[int, ...]:
        """The weight with its whole-layer channel axis split into ``(groups, size/g)``:
        there both channel maps broadcast without a full-size copy."""
        f = self._full_axis % len(self.shape)
        return (*self.shape[:f], self.groups, self.shape[f] // self.groups, *self.shape[f + 1 :])

    def _grouped_maps(self) -> tuple[NDArray[np.int64], NDArray[np.int64], tuple[int, ...]]:
        """(map of the whole-layer axis, map of the within-group axis, view) for g > 1."""
        view = self._view()
        nd = len(self.shape)
        f = self._full_axis % nd
        p = self._group_axis % nd
        p_view = p + 1 if p > f else p
        full = channel_map(view, (f, f + 1))
        # channel gi*size + j: gi on view axis f, j on the within-group axis
        gi = _along(view, f, view[f])
        j = _along(view, p_view, view[p_view])
        within = (gi * view[p_view] + j).astype(np.int64)
        return full, within, view

    def maps(self, need_in: bool) -> Maps:
        """(output map, input map or None, view or None): the :func:`channel_map` of the
        output (and, with ``need_in``, input) channels, broadcastable to the weight, or to
        ``view`` (a reshape of it) when that is not None."""
        if self.groups == 1:
            out = channel_map(self.shape, self.out_axes)
            return out, channel_map(self.shape, self.in_axes) if need_in else None, None
        if not need_in and not self.transposed:
            return channel_map(self.shape, self.out_axes), None, None  # the whole-layer axis
        full, within, view = self._grouped_maps()
        out, inp = (within, full) if self.transposed else (full, within)
        return out, inp if need_in else None, view


def _along(view: tuple[int, ...], axis: int, n: int) -> NDArray[np.int64]:
    shape = [1] * len(view)
    shape[axis] = n
    return np.arange(n, dtype=np.int64).reshape(shape)


def _axes_valid(layout: Layout, axes: tuple[int, ...]) -> bool:
    nd = len(layout.shape)
    return all(-nd <= a < nd for a in axes)


def _group_reason(layout: Layout, layer: str, direction: str) -> Reason | None:
    """Why a grouped layout cannot be split into its groups (None when it can)."""
    if direction == "backward":
        full = layout.shape[layout._full_axis]
        if full % layout.groups:
            return tagged(
                "unsupported-layer",
                f"{layer} weight has {full} input channels, not divisible by group={layout.groups}",
            )
        return None
    if (
        not (_axes_valid(layout, layout.out_axes) and _axes_valid(layout, layout.in_axes))
        or layout.shape[layout._full_axis] % layout.groups
    ):
        which = "input" if layout.transposed else "output"
        return tagged(
            "unsupported-layer",
            f"{layer} weight of shape {list(layout.shape)}: its {which} channels do not "
            f"divide into group={layout.groups}",
        )
    return None


def _widened(aff: Affine, n: int) -> Affine:
    """``aff`` for ``n`` channels: itself, or its one value repeated (a scalar affine)."""
    if aff.channels == n:
        return aff
    return Affine(np.full(n, aff.scale[0]), np.full(n, aff.shift[0]))


@dataclass(frozen=True)
class BackwardPlan:
    """Fold an affine on the layer's output into it (see :func:`plan_backward`)."""

    layout: Layout
    affine: Affine  # one value per output channel

    def fold(
        self,
        weight: NDArray[Any],
        bias: NDArray[Any] | None,
        *,
        weight_dtype: Any = None,
        bias_dtype: Any = None,
        lazy: bool = False,
    ) -> tuple[Any, NDArray[Any]]:
        """(new weight, new bias): :func:`bnfuse.fold.fold_backward` with this layout's
        output map; the bias rounded once to ``bias_dtype`` when given (raising
        :class:`OverflowError` before the caller writes anything)."""
        out_map, _, view = self.layout.maps(need_in=False)
        w2, b2 = fold.fold_backward(
            weight, bias, self.affine, out_map, weight_dtype=weight_dtype, lazy=lazy, view=view
        )
        return w2, (b2 if bias_dtype is None else round_to(b2, bias_dtype))


@dataclass(frozen=True)
class ForwardPlan:
    """Fold an affine on the layer's input into it (see :func:`plan_forward`)."""

    layout: Layout
    affine: Affine  # one value per input channel (per feature after a Flatten)
    shift_zero: bool  # the affine is a pure scale

    def fold(
        self,
        weight: NDArray[Any],
        bias: NDArray[Any] | None,
        *,
        weight_dtype: Any = None,
        bias_dtype: Any = None,
        lazy: bool = False,
    ) -> tuple[Any, NDArray[Any]]:
        """(new weight, new bias ``b + W.t``): :func:`bnfuse.fold.fold_forward` with this
        layout's maps; the bias rounded once to ``bias_dtype`` when given."""
        out_map, in_map, view = self.layout.maps(need_in=True)
        if in_map is None:
            raise ValueError("a forward fold needs the input channel map")
        w2, b2 = fold.fold_forward(
            weight,
            bias,
            self.affine,
            in_map,
            out_map,
            self.layout.out_channels,
            weight_dtype=weight_dtype,
            lazy=lazy,
            view=view,
        )
        return w2, (b2 if bias_dtype is None else round_to(b2, bias_dtype))


def plan_backward(
    layout: Layout, affine: Affine, *, layer: str, norm: str = "BatchNormalization"
) -> BackwardPlan | Reason:
    """Plan folding ``affine`` (on the layer's output channels) into the layer.

    ``layer`` names the layer and ``norm`` the normalization in the refusal sentences.
    A one-channel affine folds into every channel.
    """
    if layout.groups > 1 and layout.transposed:  # the output axis counts within groups
        reason = _group_reason(layout, layer, "backward")
        if reason:
            return reason
    n = layout.out_channels
    if affine.channels not in (n, 1):
        return tagged(
            "axis-mismatch", f"{norm} has {affine.channels} channels but {layer} output has {n}"
        )
    return BackwardPlan(layout, _widened(affine, n))


def plan_forward(
    layout: Layout,
    affine: Affine,
    *,
    layer: str,
    norm: str = "BatchNormalization",
    per_feature: bool = False,
) -> ForwardPlan | Reason:
    """Plan folding ``affine`` (on the layer's input channels) into the layer.

    ``per_feature``: the affine already gives one value per input feature (expanded by
    :func:`flatten_affine`), so its size must match exactly; otherwise a one-channel
    affine folds into every channel. Refused when the layer is transposed or pads its
    input and the affine shifts.
    """
    if layout.groups > 1 or not layout.dense:
        reason = _group_reason(layout, layer, "forward")
        if reason:
            return reason
    n = layout.in_channels
    if affine.channels != n and (per_feature or affine.channels != 1):
        if layout.dense:
            text = f"{norm} gives {affine.channels} features but {layer} takes {n}"
        else:
            text = f"{norm} has {affine.channels} channels but {layer} input has {n}"
        return tagged("axis-mismatch", text)
    shift_zero = bool(np.all(affine.shift == 0))
    if layout.transposed and not shift_zero:
        return tagged("padding", TRANSPOSE_SHIFT)
    if layout.pads_input and not shift_zero:
        return tagged("padding", PADDING)
    return ForwardPlan(layout, _widened(affine, n), shift_zero)


def flatten_affine(
    affine: Affine,
    features: tuple[int, ...],
    *,
    axis: int | None,
    elem_shape: tuple[int, ...] | None = None,
    norm: str = "BatchNormalization",
    verb: str = "normalizes",
    through: str = "Flatten",
    perm: Sequence[int] | None = None,
) -> Affine | Reason:
    """The affine per feature of a flatten of a tensor of non-batch shape ``features``.

    The affine acts on ``axis`` (counted with the batch axis, None: a scalar affine) or,
    with ``elem_shape`` (its constant's shape aligned to the input rank), element-wise.
    Its values are broadcast over the feature shape and raveled in row-major order, as
    ONNX Flatten does; ``perm`` first reorders the feature axes (Keras's channels_first
    Flatten walks the channel axis last). ``norm``, ``verb`` and ``through`` (the
    flattening op) name things in the refusal sentences.
    """
    rank = len(features) + 1
    if elem_shape is not None:
        if len(elem_shape) != rank or elem_shape[0] != 1:
            return tagged(
                "axis-mismatch",
                f"{norm} constant of shape {list(elem_shape)} varies along the batch axis",
            )
        bshape: tuple[int, ...] = elem_shape[1:]
    elif axis is None:
        bshape = (1,) * (rank - 1)
    else:
        if not 1 <= axis < rank:
            return tagged(
                "axis-mismatch",
                f"{norm} {verb} axis {axis} of a rank-{rank} tensor (the batch axis)",
            )
        if affine.channels not in (1, features[axis - 1]):
            return tagged(
                "axis-mismatch",
                f"{norm} has {affine.channels} channels but axis {axis} of its input "
                f"has {features[axis - 1]}",
            )
        dims = [1] * (rank - 1)
        dims[axis - 1] = affine.channels
        bshape = tuple(dims)
    try:
        scale = np.broadcast_to(affine.scale.reshape(bshape), features)
        shift = np.broadcast_to(affine.shift.reshape(bshape), features)
    except ValueError:
        return tagged(
            "axis-mismatch", f"{norm} does not broadcast over the {through} input {list(features)}"
        )
    if perm is not None:
        scale, shift = np.transpose(scale, perm), np.transpose(shift, perm)
    return Affine(scale.reshape(-1), shift.reshape(-1))


def fold_record(
    bn: str,
    direction: Direction,
    into: Sequence[str],
    rules: Sequence[str],
    *,
    channels: int,
    kind: str = "BatchNormalization",
    details: Sequence[str] = (),
    scope: str = "",
) -> Fold:
    """The :class:`~bnfuse.result.Fold` of one normalization folded into the layers
    ``into`` by ``rules`` (a forward fold may go into several layers; each name once)."""
    return Fold(
        bn=bn,
        into=", ".join(dict.fromkeys(into)),
        rule="+".join(dict.fromkeys(rules)),
        direction=direction,
        channels=channels,
        kind=kind,
        detail="; ".join(dict.fromkeys(d for d in details if d)),
        scope=scope,
    )
