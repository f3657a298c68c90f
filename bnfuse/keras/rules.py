"""The Keras fold rules: which layers absorb a BatchNormalization, and how.

Each rule pairs a linear layer kind with a direction. A kind describes its kernel as a
:class:`bnfuse.plan.Layout`; the planning core (:mod:`bnfuse.plan`) decides whether and
how the fold goes (channel maps, groups, forward exactness) and :mod:`bnfuse.fold` does
the math. :data:`RULES` lists every rule in the order the driver tries them.

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

from bnfuse.fold import Affine, separable_bias
from bnfuse.keras.compat import flavor_of_class
from bnfuse.plan import BackwardPlan, ForwardPlan, Layout, plan_backward, plan_forward
from bnfuse.reasons import Reason, tagged

__all__ = [
    "BACKWARD_RULES",
    "FORWARD_RULES",
    "RULES",
    "Kind",
    "Rule",
    "backward_rule_for",
    "forward_rule_for",
    "rule_by_name",
    "rule_names",
]

F64 = NDArray[np.float64]
Weights = dict[str, F64]


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
    """A linear layer kind: the classes it covers and how it describes itself to the
    planning core (:class:`bnfuse.plan.Layout`, see the table in :mod:`bnfuse.plan`)."""

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

    def variable(self, direction: str) -> str:
        """The kernel variable a fold in ``direction`` scales (a separable convolution:
        the pointwise kernel backward, the depthwise one forward)."""
        if self.key == "separable" and direction == "forward":
            return "depthwise_kernel"
        return self.kernel

    def layout(
        self,
        layer: Any,
        w: Weights,
        direction: str,
        in_shape: tuple[int | None, ...] | None = None,
    ) -> Layout:
        """The :class:`~bnfuse.plan.Layout` of the kernel a fold in ``direction`` scales;
        forward, whether the layer pads an input of ``in_shape``."""
        shape = tuple(int(d) for d in w[self.variable(direction)].shape)
        pads = (
            direction == "forward"
            and self.key in ("conv", "depthwise", "separable")
            and _pads_input(layer, in_shape)
        )
        if self.key == "dense":  # (in, out)
            return Layout(shape, (1,), (0,), dense=True)
        if self.key == "transpose":  # (k..., out, in)
            return Layout(shape, (-2,), (-1,), transposed=True, pads_input=pads)
        if self.key == "depthwise" or (self.key == "separable" and direction == "forward"):
            return Layout(shape, (-2, -1), (-2,), pads_input=pads)  # (k..., in, mult)
        groups = int(getattr(layer, "groups", 1) or 1) if self.key == "conv" else 1
        return Layout(shape, (-1,), (-2,), groups=groups, pads_input=pads)  # (k..., in/g, out)


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
    """A named fold, of the same shape as an ONNX rule (:mod:`bnfuse.onnx.rulebase`):
    ``kind`` absorbs a BN before (forward) or after (backward) it.

    :meth:`match` is the pattern (the neighbouring layer), :meth:`check` returns a
    reason the layer cannot take any fold (or None), :meth:`plan` asks the planning core
    (:mod:`bnfuse.plan`) for a plan or a tagged refusal, and :meth:`rewrite` gathers the
    arrays, calls the plan and writes the new values back into the weights. The graph
    edits (removing the BN, rewiring, turning ``use_bias`` on) are the driver's.
    """

    name: str
    direction: Literal["backward", "forward"]
    kind: Kind
    via_flatten: bool = False
    doc: str = ""

    def match(self, layer: Any) -> bool:
        """Is ``layer`` of this rule's kind?"""
        return self.kind.matches(layer)

    def check(self, layer: Any) -> Reason | None:
        """Why ``layer`` cannot take this fold whatever its weights (None: it can)."""
        if self.direction == "backward":
            return activation_refusal(layer) or layer_refusal(layer)
        return layer_refusal(layer)

    def plan(
        self,
        layer: Any,
        w: Weights,
        aff: Affine,
        *,
        norm: str = "BatchNormalization",
        in_shape: tuple[int | None, ...] | None = None,
        per_feature: bool = False,
    ) -> BackwardPlan | ForwardPlan | Reason:
        """The core's plan for folding ``aff`` into ``layer`` (weights ``w``), or why not."""
        layout = self.kind.layout(layer, w, self.direction, in_shape)
        what = f"{type(layer).__name__} '{layer.name}'"
        if self.direction == "backward":
            return plan_backward(layout, aff, layer=what, norm=norm)
        return plan_forward(layout, aff, layer=what, norm=norm, per_feature=per_feature)

    def rewrite(self, w: Weights, plan: BackwardPlan | ForwardPlan) -> Weights:
        """The layer's new float64 weights: ``w`` with the folded kernel and bias."""
        var = self.kind.variable(self.direction)
        new_k, new_b = plan.fold(w[var], w.get("bias") if var != "depthwise_kernel" else None)
        out = dict(w)
        out[var] = np.asarray(new_k, dtype=np.float64)
        if var == "depthwise_kernel":  # the depthwise output shift goes to the bias
            out["bias"] = separable_bias(w["pointwise_kernel"], w.get("bias"), new_b)
        else:
            out["bias"] = new_b
        return out

    def detail(self, plan: ForwardPlan) -> str:
        """What a forward fold's record says about exactness (a pure scale)."""
        if not plan.shift_zero:
            return ""
        if plan.layout.transposed:
            return "scale only (BN shift is exactly zero)"
        if plan.layout.pads_input:
            return "scale only (BN shift is exactly zero; padding stays zero)"
        return ""


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


def layer_refusal(layer: Any) -> Reason | None:
    """Reasons a linear layer cannot take any fold, whatever the direction."""
    mode = getattr(layer, "quantization_mode", None)
    if mode:
        return tagged("unsupported-layer", f"layer '{layer.name}' is quantized ({mode})")
    if getattr(layer, "lora_enabled", False):
        return tagged("unsupported-layer", f"layer '{layer.name}' has LoRA enabled")
    return None


def activation_refusal(layer: Any) -> Reason | None:
    if not _is_linear_activation(layer):
        return tagged("activation-between", "activation between layer and BN")
    return None
