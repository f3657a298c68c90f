"""Forward rules for ONNX graphs: the normalization, then a linear consumer.

Same shape as the backward rules (:mod:`bnfuse.onnx.rulebase`): ``match`` takes one
consumer of the normalization's output; the driver folds forward only when every
consumer matches and passes its check, preparing every target before writing any.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from bnfuse.fold import Affine, gemm_bias_forward
from bnfuse.onnx.graph import Graph, attr, node_label, set_attr
from bnfuse.onnx.norm import Norm
from bnfuse.onnx.rulebase import (
    ForwardMatch,
    Rule,
    Write,
    add_bias_after,
    bias_of,
    conv_layout,
    dtype_of,
    float_weight_reason,
    layout_of,
    like_of,
    matrix_layout,
    optional_const_reason,
    per_channel_bias,
    planned,
    ref_attr_reason,
    weight_reason,
)
from bnfuse.plan import ForwardPlan, flatten_affine, plan_forward
from bnfuse.reasons import Reason, tagged

__all__ = ["FORWARD_RULES", "BNConv", "BNGemm", "ForwardRule"]

_DEFAULT = ("", "ai.onnx")


class ForwardRule(Rule[ForwardMatch]):
    """Fold a normalization into a linear consumer of its output."""

    direction = "forward"


class BNConv(ForwardRule):
    """BN then Conv without padding: Conv(s*x + t) == Conv_{W s[i]}(x) + sum W t[i]."""

    name = "bn-conv"

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> ForwardMatch | None:
        if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in _DEFAULT:
            return None
        return ForwardMatch(norm, node)

    def check(self, m: ForwardMatch, g: Graph) -> Reason | None:
        norm, c = m.norm, m.node
        if c.input[0] != norm.output or list(c.input).count(norm.output) != 1:
            return tagged(
                "unsupported-layer",
                f"{norm.kind} output feeds {c.op_type} {node_label(c)!r} as a weight",
            )
        reason = (
            norm.channel_axis_reason(f"{c.op_type} input")
            or ref_attr_reason(c)
            or weight_reason(g, c, 1)
            or optional_const_reason(g, c, 2)
            or float_weight_reason(g, c.input[1])
        )
        if reason:
            return reason
        plan = self.plan(m, g)
        return plan if isinstance(plan, str) else None

    def plan(self, m: ForwardMatch, g: Graph) -> ForwardPlan | Reason:
        c = m.node
        layout = layout_of(m, lambda: conv_layout(c, g.const(c.input[1])))
        return plan_forward(layout, m.norm.affine, layer=c.op_type, norm=m.norm.kind)

    def prepare(self, m: ForwardMatch, g: Graph) -> Write:
        c = m.node
        w = g.const(c.input[1])
        plan = planned(self.plan(m, g), self.name)
        has_bias = len(c.input) > 2 and bool(c.input[2])
        like = like_of(c, 2)
        w2, b2 = plan.fold(
            w, bias_of(g, c, 2), weight_dtype=w.dtype, bias_dtype=dtype_of(g, like), lazy=True
        )
        m.scale_only = plan.shift_zero

        def write() -> str:
            g.write_const(c, 1, w2, c.input[1], f"{c.input[1]}_bnfused")
            if has_bias or np.any(b2 != 0):
                g.write_const(c, 2, b2, like, f"{node_label(c)}_bias_bnfused")
            return node_label(c)

        return write


class BNGemm(ForwardRule):
    """BN then Gemm/MatMul (optionally via Flatten): rows of the weight scale by s; bias += t·W."""

    name = "bn-gemm"

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> ForwardMatch | None:
        if node.domain not in _DEFAULT:
            return None
        if node.op_type in ("Flatten", "Reshape"):
            after = g.only_consumer(node.output[0])
            return ForwardMatch(norm, after if after is not None else node, via=node)
        return ForwardMatch(norm, node) if node.op_type in ("Gemm", "MatMul") else None

    def check(self, m: ForwardMatch, g: Graph) -> Reason | None:
        norm, c, via = m.norm, m.node, m.via
        if via is not None:
            reason = _via_reason(m, g)
            if reason:
                return reason
        src = via.output[0] if via is not None else norm.output
        if c.input[0] != src or list(c.input).count(src) != 1:
            return tagged(
                "unsupported-layer",
                f"{norm.kind} output feeds {c.op_type} {node_label(c)!r} as its weight",
            )
        if c.op_type == "Gemm" and attr(c, "transA", 0):
            return tagged(
                "axis-mismatch",
                "Gemm transposes its input (transA=1): BN channel axis is not the reduced axis",
            )
        reason = ref_attr_reason(c) or weight_reason(g, c, 1) or float_weight_reason(g, c.input[1])
        if c.op_type == "Gemm":
            reason = reason or optional_const_reason(g, c, 2)
        if reason:
            return reason
        if g.const(c.input[1]).ndim != 2:
            return tagged("unsupported-layer", f"{c.op_type} weight is not 2-D")
        if via is None:
            reason = _last_axis_reason(norm, c, g)
            if reason:
                return reason
        plan = self.plan(m, g)
        return plan if isinstance(plan, str) else None

    def plan(self, m: ForwardMatch, g: Graph) -> ForwardPlan | Reason:
        c = m.node
        layout = layout_of(
            m,
            lambda: matrix_layout(
                g.const(c.input[1]), trans=c.op_type == "Gemm" and bool(attr(c, "transB", 0))
            ),
        )
        aff: Affine | Reason = m.norm.affine if m.via is None else flattened(m.norm, m.via, g)
        if isinstance(aff, str):
            return aff  # ``check`` refused it already
        return plan_forward(
            layout, aff, layer=c.op_type, norm=m.norm.kind, per_feature=m.via is not None
        )

    def prepare(self, m: ForwardMatch, g: Graph) -> Write:
        c = m.node
        w = g.const(c.input[1])
        plan = planned(self.plan(m, g), self.name)
        w2, tw = plan.fold(w, None, weight_dtype=w.dtype, lazy=True)
        # plan the bias, every value rounded (overflow checked) before anything is written
        write_bias: Callable[[], None] | None = None
        if c.op_type == "Gemm":
            write_bias = _gemm_bias(c, tw, g)
        elif np.any(tw != 0):
            write_bias = _matmul_bias(c, tw, plan.layout.out_channels, g)

        def write() -> str:
            g.write_const(c, 1, w2, c.input[1], f"{c.input[1]}_bnfused")
            if write_bias is not None:
                write_bias()
            return node_label(c)

        return write


def _via_reason(m: ForwardMatch, g: Graph) -> Reason | None:
    """Why the Flatten/Reshape between does not lead a provable flatten into a
    Gemm/MatMul (None when it does)."""
    via = m.via
    if via is None:
        return None
    flat = flattened(m.norm, via, g)
    if isinstance(flat, str):
        return flat
    if g.only_consumer(via.output[0]) is None:
        reason = g.intermediate_reason(via.output[0], via.op_type)
        return reason or tagged("no-partner", f"{via.op_type} output has no consumer")
    if m.node.op_type not in ("Gemm", "MatMul") or m.node.domain not in _DEFAULT:
        return tagged(
            "no-partner", f"{via.op_type} is followed by {m.node.op_type}, not Gemm/MatMul"
        )
    return None


def _last_axis_reason(norm: Norm, c: onnx.NodeProto, g: Graph) -> Reason | None:
    """Without a Flatten: Gemm takes a 2-D input; MatMul with a 2-D weight reduces the
    LAST axis of an input of any rank, so a last-axis affine (or scalar) folds into its
    rows."""
    if norm.elem_shape is not None:
        return norm.elementwise_reason()
    if norm.axis is None:
        return None
    rank = norm.rank if norm.rank is not None else g.rank(norm.input)
    if rank is None:
        return tagged(
            "axis-mismatch",
            f"cannot prove the rank of the {c.op_type} input (no shape information)",
        )
    if (c.op_type == "Gemm" and rank != 2) or norm.axis != rank - 1:
        return tagged(
            "axis-mismatch",
            f"{norm.kind} {norm.verb} axis {norm.axis} of a rank-{rank} tensor but "
            f"{c.op_type} reduces over the last axis",
        )
    return None


def flattened(norm: Norm, c: onnx.NodeProto, g: Graph) -> Affine | Reason:
    """The affine per feature of what Flatten/Reshape ``c`` makes of the norm's output:
    the input's non-batch dims must be static and ``c`` provably a flatten to
    ``[N, features]``; the expansion itself is :func:`bnfuse.plan.flatten_affine`."""
    shape = g.shapes.get(norm.input)
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        return tagged(
            "axis-mismatch", f"cannot prove the {c.op_type} feature order (unknown input shape)"
        )
    feat_shape = tuple(int(d) for d in shape[1:])  # type: ignore[arg-type]
    feat = math.prod(feat_shape)
    if c.op_type == "Flatten":
        if int(attr(c, "axis", 1)) != 1:
            return tagged("axis-mismatch", "Flatten axis is not 1")
    else:  # Reshape: must produce [N, prod(dims)]
        if g.const_reason(c.input[1]):
            return tagged("not-constant", "Reshape shape is not a constant")
        target = [int(v) for v in g.const(c.input[1]).reshape(-1)]
        ok = (
            len(target) == 2
            and target[1] in (-1, feat)
            and target[0] in (0, -1, shape[0])
            and not (target[0] == -1 and target[1] != feat)
        )
        if not ok:
            return tagged("axis-mismatch", f"Reshape to {target} is not a provable flatten")
    return flatten_affine(
        norm.affine,
        feat_shape,
        axis=norm.axis,
        elem_shape=norm.elem_shape,
        norm=norm.kind,
        verb=norm.verb,
        through=c.op_type,
    )


def _gemm_bias(c: onnx.NodeProto, tw: np.ndarray, g: Graph) -> Callable[[], None] | None:
    """How to add ``tw`` (``t·B``) to a Gemm's output: its new ``C`` (and beta = 1), or
    None when it needs none. The values are rounded here; the returned call writes."""
    c2 = gemm_bias_forward(
        bias_of(g, c, 2), float(attr(c, "alpha", 1.0)), float(attr(c, "beta", 1.0)), tw
    )
    if c2 is None:
        return None
    like = like_of(c, 2)
    c2r = g.rounded(c2, like)

    def write_bias() -> None:
        g.write_const(c, 2, c2r, like, f"{node_label(c)}_C_bnfused")
        set_attr(c, "beta", 1.0)

    return write_bias


def _matmul_bias(c: onnx.NodeProto, tw: np.ndarray, n: int, g: Graph) -> Callable[[], None]:
    """How to add ``tw`` to a MatMul's output: into the constant of the Add after it, or
    through a new Add. The values are rounded here; the returned call writes."""
    add = g.only_consumer(c.output[0])
    if add is not None and add.op_type == "Add":
        slot = 1 if add.input[0] == c.output[0] else 0
        bname = add.input[slot]
        if not g.const_reason(bname):
            b = g.const(bname)
            if per_channel_bias(b, n, g.rank(add.output[0]) or 1):
                b64 = np.broadcast_to(b.astype(np.float64).reshape(-1), (n,)) + tw
                new_b = g.rounded(b64.reshape(b.shape if b.size == n else (n,)), bname)

                def into_add() -> None:
                    g.write_const(add, slot, new_b, bname, f"{node_label(add)}_bias_bnfused")

                return into_add
    twr = g.rounded(tw, c.input[1])

    def new_add() -> None:
        add_bias_after(c, twr, g)

    return new_add


FORWARD_RULES: tuple[ForwardRule, ...] = (BNConv(), BNGemm())
