"""The normalizations the ONNX rules fold: :class:`Norm` (a per-channel affine on one axis
of a tensor, a BatchNormalization or a BN in disguise) and :func:`bn_norm`, which reads
a BatchNormalization node as one. :mod:`bnfuse.onnx.affine` finds the disguised ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfuse.fold import Affine, checked_bn_affine
from bnfuse.onnx.graph import Graph, attr, node_label
from bnfuse.reasons import Reason, tagged

__all__ = ["ELEMENTWISE", "Norm", "bn_norm"]

#: ``Norm.axis`` of an element-wise affine (see ``Norm.elem_shape``).
ELEMENTWISE = -(10**6)


@dataclass
class Norm:
    """A per-channel affine on axis ``axis`` of tensor ``input`` (a BN, or BN in disguise).

    ``axis`` counts from the front (a BN normalizes axis 1); None means a scalar affine,
    the same on every element, which folds along any axis. ``rank`` is the rank of
    ``input`` when known, so rules can tell whether ``axis`` is the last axis.
    """

    name: str
    kind: str
    nodes: list[onnx.NodeProto]  # removed when folded; nodes[-1] produces ``output``
    input: str
    output: str
    affine: Affine
    axis: int | None = 1
    params: list[str] = field(default_factory=list)  # constant inputs, dropped if unused after
    rank: int | None = None
    #: For an element-wise affine (a constant varying along several axes, e.g. a
    #: first-layer input standardization of shape (1, 28, 28)): the constant's shape
    #: aligned to the input rank; ``affine`` then holds its values in that row-major order
    #: and ``axis`` is :data:`ELEMENTWISE`. Only a Flatten/Reshape into Gemm/MatMul folds it.
    elem_shape: tuple[int, ...] | None = None

    @property
    def channels(self) -> int:
        return self.affine.channels

    @property
    def verb(self) -> str:
        return "normalizes" if self.kind == "BatchNormalization" else "acts on"

    def elementwise_reason(self) -> Reason | None:
        """Why an element-wise affine cannot fold here (None for per-channel ones)."""
        if self.elem_shape is None:
            return None
        return tagged(
            "axis-mismatch",
            f"{self.kind} constant varies along several axes of its input "
            f"(shape {list(self.elem_shape)}): not a per-channel affine "
            "(only a Flatten into Gemm/MatMul can take it)",
        )

    def channel_axis_reason(self, what: str) -> Reason | None:
        """None when the affine acts on axis 1 (the NCHW channel / Gemm N axis)."""
        if self.elem_shape is not None:
            return self.elementwise_reason()
        if self.axis is None or self.axis == 1:
            return None
        where = f"a rank-{self.rank} {what}" if self.rank is not None else f"the {what}"
        last = " (the last axis)" if self.rank is not None and self.axis == self.rank - 1 else ""
        return tagged(
            "axis-mismatch",
            f"{self.kind} {self.verb} axis {self.axis}{last} of {where}, not its channel axis 1",
        )

    def last_axis_reason(self, what: str, uses: str) -> Reason | None:
        """None when the affine acts on the last axis of its tensor (or is a scalar)."""
        if self.elem_shape is not None:
            return self.elementwise_reason()
        if self.axis is None:
            return None
        if self.rank is None:
            return tagged("axis-mismatch", f"cannot prove the {what} rank (no shape information)")
        if self.axis != self.rank - 1:
            return tagged(
                "axis-mismatch",
                f"{self.kind} {self.verb} axis {self.axis} of a rank-{self.rank} {what}, but {uses}",
            )
        return None


def bn_norm(node: onnx.NodeProto, g: Graph, opset: int) -> Norm | Reason:
    """The affine of a BatchNormalization node, or why it cannot be folded at all."""
    if len(node.input) < 5:
        return tagged("unsupported-layer", "malformed BatchNormalization (fewer than 5 inputs)")
    extra = [o for o in node.output[1:] if o]
    if extra:
        return tagged(
            "training-mode", "BatchNormalization training outputs (running mean/var) are used"
        )
    if attr(node, "training_mode", 0):
        return tagged("training-mode", "BatchNormalization is in training mode (training_mode=1)")
    if opset < 7 and attr(node, "is_test", 0) == 0:
        return tagged("training-mode", "BatchNormalization is in training mode (is_test=0)")
    for p in node.input[1:5]:
        reason = g.const_reason(p)
        if reason:
            return reason.reworded(f"BN parameter {reason}")
    scale, bias, mean, var = (g.const(p).astype(np.float64) for p in node.input[1:5])
    eps = float(attr(node, "epsilon", 1e-5))
    if opset < 9 and attr(node, "spatial", 1) == 0 and mean.ndim > 1:
        return tagged(
            "axis-mismatch",
            "BatchNormalization with spatial=0 normalizes every element, not per channel",
        )
    if not all(a.ndim <= 1 for a in (scale, bias, mean, var)):
        return tagged("axis-mismatch", "BN parameters are not per-channel vectors")
    n = mean.size
    if not all(a.size == n for a in (scale, bias, var)):
        return tagged("axis-mismatch", "BN parameters have different lengths")
    aff = checked_bn_affine(mean, var, eps, scale, bias)
    if isinstance(aff, str):
        return aff
    return Norm(
        name=node_label(node),
        kind="BatchNormalization",
        nodes=[node],
        input=node.input[0],
        output=node.output[0],
        affine=aff,
        axis=1,
        params=list(node.input[1:5]),
        rank=g.rank(node.input[0]),
    )
