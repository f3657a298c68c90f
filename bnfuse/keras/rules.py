"""The Keras fold rules: which layers absorb a BatchNormalization, and how.

Each rule pairs a linear layer kind with a direction. The math lives in
:mod:`bnfuse.fold`; a rule only knows the layer's weight layout (which axis of which
variable holds the output or input channels) and when the fold is exact.

Identities (BN as the per-channel affine ``z = s*x + t``, see :mod:`bnfuse.fold`):

* backward  ``BN(L(x)) = L'(x)``:  scale L's output channels by ``s``, bias ``s*b + t``.
* forward   ``L(BN(x)) = L'(x)``:  scale L's input channels by ``s``, bias ``b + W·t``;
  exact only when L never pads its input with zeros (the zeros would be BN outputs in the
  original but BN inputs after the fold), or when ``t == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from bnfuse.fold import Affine, channel_map, fold_backward, fold_forward
from bnfuse.keras.compat import flavor_of_class
from bnfuse.reasons import PADDING, TRANSPOSE_SHIFT

__all__ = [
    "BACKWARD_RULES",
    "FORWARD_RULES",
    "PADDING_REASON",
    "RULES",
    "TRANSPOSE_SHIFT_REASON",
    "Kind",
    "Rule",
    "backward_rule_for",
    "forward_rule_for",
    "rule_by_name",
    "rule_names",
]

F64 = NDArray[np.float64]
Weights = dict[str, F64]

PADDING_REASON = PADDING  # one wording for every backend (bnfuse/reasons.py)
TRANSPOSE_SHIFT_REASON = TRANSPOSE_SHIFT


def _is_linear_activation(layer: Any) -> bool:
    act = getattr(layer, "activation", None)
    return act is None or getattr(act, "__name__", "") == "linear"


def _spatial_channel_axis(layer: Any, rank: int) -> int:
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def _pads_input(layer: Any, in_shape: tuple[int | None, ...] | None) -> bool:
    """Does this convolution pad its input with zeros (for this input shape)?"""
    padding = str(getattr(layer, "padding", "valid")).lower()
    if padding == "valid":
        return False
    ksize = tuple(layer.kernel_size)
    dil = tuple(getattr(layer, "dilation_rate", (1,) * len(ksize)))
    strides = tuple(getattr(layer, "strides", (1,) * len(ksize)))
    eff = [(k - 1) * d + 1 for k, d in zip(ksize, dil, strict=True)]
    if all(e == 1 for e in eff):
        return False
    if padding == "causal":
        return True
    if in_shape is None:
        return True
    rank = len(in_shape)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        spatial = in_shape[2:]
    else:
        spatial = in_shape[1 : rank - 1]
    for size, e, s in zip(spatial, eff, strides, strict=False):
        if e == 1:
            continue
        if size is None:
            return True
        out = -(-size // s)
        if (out - 1) * s + e - size > 0:
            return True
    return False


@dataclass(frozen=True)
class Kind:
    """A linear layer kind and its weight layout."""

    key: str
    types: tuple[str, ...]  # class names, the same in Keras 3 and Keras 2
    kernel: str  # the variable the output channels live in (backward fold)

    def matches(self, layer: Any) -> bool:
        cls = type(layer)
        if cls.__name__ not in self.types:
            return False
        fl = flavor_of_class(cls)
        return fl is not None and cls in fl.classes(self.types)

    def channel_axis(self, layer: Any, rank: int) -> int:
        """Axis of the channels in this layer's input and output tensors (of ``rank``)."""
        if self.key == "dense":
            return rank - 1
        return _spatial_channel_axis(layer, rank)

    def out_channels(self, layer: Any, w: Weights) -> int:
        if self.key == "depthwise":
            k = w["kernel"]
            return int(k.shape[-2] * k.shape[-1])
        if self.key == "transpose":
            return int(w["kernel"].shape[-2])
        return int(w[self.kernel].shape[-1])

    # -- backward: BN after the layer -----------------------------------------------

    def backward(self, layer: Any, w: Weights, aff: Affine) -> Weights:
        k = w[self.kernel]
        if self.key == "depthwise":
            axes: tuple[int, ...] = (-2, -1)  # out channel = in * mult + m
        elif self.key == "transpose":
            axes = (-2,)  # (k..., out, in)
        else:
            axes = (-1,)  # Dense (in, out); Conv (k..., in/g, out); pointwise (1..., in, out)
        new_k, new_b = fold_backward(k, w.get("bias"), aff, channel_map(k.shape, axes))
        out = dict(w)
        out[self.kernel] = new_k
        out["bias"] = new_b
        return out

    # -- forward: BN before the layer -----------------------------------------------

    def forward(
        self,
        layer: Any,
        w: Weights,
        aff: Affine,
        in_map: NDArray[np.int64] | None = None,
    ) -> Weights:
        """Fold ``aff`` (on the input channels) into the layer.

        ``in_map`` overrides the kernel's input-channel map (BN -> Flatten -> Dense).
        """
        out = dict(w)
        if self.key == "separable":
            dk, pk = w["depthwise_kernel"], w["pointwise_kernel"]
            mid = int(dk.shape[-2] * dk.shape[-1])
            new_dk, shift = fold_forward(
                dk,
                None,
                aff,
                channel_map(dk.shape, (-2,)),
                channel_map(dk.shape, (-2, -1)),
                mid,
            )
            # the depthwise output shift passes through the pointwise kernel into the bias
            through = Affine(np.ones(mid), shift)
            _, new_b = fold_forward(
                pk,
                w.get("bias"),
                through,
                channel_map(pk.shape, (-2,)),
                channel_map(pk.shape, (-1,)),
                int(pk.shape[-1]),
            )
            out["depthwise_kernel"] = new_dk
            out["bias"] = new_b
            return out
        k = w["kernel"]
        n_out = self.out_channels(layer, w)
        if self.key == "dense":
            imap = in_map if in_map is not None else channel_map(k.shape, (0,))
            omap = channel_map(k.shape, (1,))
        elif self.key == "conv":
            cin_g, cout = int(k.shape[-2]), int(k.shape[-1])
            groups = int(getattr(layer, "groups", 1) or 1)
            j = np.arange(cin_g).reshape(-1, 1)
            o = np.arange(cout).reshape(1, -1)
            grid = (o // (cout // groups)) * cin_g + j
            imap = grid.reshape((1,) * (k.ndim - 2) + grid.shape).astype(np.int64)
            omap = channel_map(k.shape, (-1,))
        elif self.key == "depthwise":
            imap = channel_map(k.shape, (-2,))
            omap = channel_map(k.shape, (-2, -1))
        else:  # transpose (k..., out, in)
            imap = channel_map(k.shape, (-1,))
            omap = channel_map(k.shape, (-2,))
        new_k, new_b = fold_forward(k, w.get("bias"), aff, imap, omap, n_out)
        out["kernel"] = new_k
        out["bias"] = new_b
        return out

    def forward_exactness(
        self, layer: Any, aff: Affine, in_shape: tuple[int | None, ...] | None
    ) -> tuple[str | None, str]:
        """(refusal reason or None, detail) for folding ``aff`` into this layer's input."""
        shift_zero = bool(np.all(aff.shift == 0.0))
        if self.key == "transpose":
            if shift_zero:
                return None, "scale only (BN shift is exactly zero)"
            return TRANSPOSE_SHIFT_REASON, ""
        if self.key in ("conv", "depthwise", "separable") and _pads_input(layer, in_shape):
            if shift_zero:
                return None, "scale only (BN shift is exactly zero; padding stays zero)"
            return PADDING_REASON, ""
        return None, ""


def _kinds() -> dict[str, Kind]:
    return {
        "dense": Kind("dense", ("Dense",), "kernel"),
        "conv": Kind("conv", ("Conv1D", "Conv2D", "Conv3D"), "kernel"),
        "depthwise": Kind("depthwise", ("DepthwiseConv1D", "DepthwiseConv2D"), "kernel"),
        "separable": Kind("separable", ("SeparableConv1D", "SeparableConv2D"), "pointwise_kernel"),
        "transpose": Kind(
            "transpose", ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"), "kernel"
        ),
    }


KINDS = _kinds()


@dataclass(frozen=True)
class Rule:
    """A named fold: ``kind`` absorbs a BN before (forward) or after (backward) it."""

    name: str
    direction: Literal["backward", "forward"]
    kind: Kind
    via_flatten: bool = False
    doc: str = ""


#: BN folded into the layer that produced its input.
BACKWARD_RULES: tuple[Rule, ...] = (
    Rule("dense-bn", "backward", KINDS["dense"], doc="BN(Dense(x)) -> Dense'(x)"),
    Rule("conv-bn", "backward", KINDS["conv"], doc="BN(ConvND(x)) -> ConvND'(x), any groups"),
    Rule(
        "depthwise-bn",
        "backward",
        KINDS["depthwise"],
        doc="BN(DepthwiseConv(x)) -> DepthwiseConv'(x); channel i*mult+m",
    ),
    Rule(
        "separable-bn",
        "backward",
        KINDS["separable"],
        doc="BN(SeparableConv(x)) -> SeparableConv'(x); folded into the pointwise kernel",
    ),
    Rule(
        "conv-transpose-bn",
        "backward",
        KINDS["transpose"],
        doc="BN(ConvNDTranspose(x)) -> ConvNDTranspose'(x); kernel (k..., out, in)",
    ),
)

#: BN folded into the layer that consumes its output.
FORWARD_RULES: tuple[Rule, ...] = (
    Rule("bn-dense", "forward", KINDS["dense"], doc="Dense(BN(x)) -> Dense'(x)"),
    Rule(
        "bn-flatten-dense",
        "forward",
        KINDS["dense"],
        via_flatten=True,
        doc="Dense(Flatten(BN(x))) -> Dense'(Flatten(x)); s, t expanded to flat order",
    ),
    Rule("bn-conv", "forward", KINDS["conv"], doc="ConvND(BN(x)) -> ConvND'(x) without padding"),
    Rule(
        "bn-depthwise",
        "forward",
        KINDS["depthwise"],
        doc="DepthwiseConv(BN(x)) -> DepthwiseConv'(x) without padding",
    ),
    Rule(
        "bn-separable",
        "forward",
        KINDS["separable"],
        doc="SeparableConv(BN(x)) -> SeparableConv'(x); depthwise scaled, shift to bias",
    ),
    Rule(
        "bn-conv-transpose",
        "forward",
        KINDS["transpose"],
        doc="ConvNDTranspose(BN(x)) -> ConvNDTranspose'(x) when the BN shift is zero",
    ),
)

RULES: tuple[Rule, ...] = BACKWARD_RULES + FORWARD_RULES


def rule_names() -> tuple[str, ...]:
    return tuple(r.name for r in RULES)


def rule_by_name(name: str) -> Rule:
    for r in RULES:
        if r.name == name:
            return r
    raise KeyError(name)


def backward_rule_for(layer: Any) -> Rule | None:
    for r in BACKWARD_RULES:
        if r.kind.matches(layer):
            return r
    return None


def forward_rule_for(layer: Any, via_flatten: bool = False) -> Rule | None:
    for r in FORWARD_RULES:
        if r.via_flatten == via_flatten and r.kind.matches(layer):
            return r
    return None


def layer_refusal(layer: Any) -> str | None:
    """Reasons a linear layer cannot take any fold, whatever the direction."""
    mode = getattr(layer, "quantization_mode", None)
    if mode:
        return f"layer '{layer.name}' is quantized ({mode})"
    if getattr(layer, "lora_enabled", False):
        return f"layer '{layer.name}' has LoRA enabled"
    return None


def activation_refusal(layer: Any) -> str | None:
    if not _is_linear_activation(layer):
        return "activation between layer and BN"
    return None
