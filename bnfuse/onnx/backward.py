"""Backward rules for ONNX graphs: a linear producer, then the normalization.

Each rule states the identity it relies on; the shape of a rule is in
:mod:`bnfuse.onnx.rulebase`, the layouts and plans in :mod:`bnfuse.plan`, the numbers
in :mod:`bnfuse.fold`.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfuse.errors import FusionInvariantError
from bnfuse.fold import gemm_bias_backward
from bnfuse.onnx.graph import Graph, attr, node_label, set_attr
from bnfuse.onnx.norm import Norm
from bnfuse.onnx.rulebase import (
    BackwardMatch,
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
from bnfuse.plan import BackwardPlan, plan_backward
from bnfuse.reasons import Reason, tagged

__all__ = ["BACKWARD_RULES", "BackwardRule", "ConvBN", "ConvTransposeBN", "GemmBN", "MatMulBN"]


class BackwardRule(Rule[BackwardMatch]):
    """Base class: the normalization's input is produced by one of ``ops``."""

    direction = "backward"
    ops: tuple[str, ...] = ()

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> BackwardMatch | None:
        if node.op_type not in self.ops or node.domain not in ("", "ai.onnx"):
            return None
        return BackwardMatch(norm, node)

    def check(self, m: BackwardMatch, g: Graph) -> Reason | None:
        """The checks every rule makes, those on the weights, then the core's plan."""
        reason = self._common(m, g) or self._weights_reason(m, g)
        if reason:
            return reason
        plan = self.plan(m, g)
        return plan if isinstance(plan, str) else None

    def _weights_reason(self, m: BackwardMatch, g: Graph) -> Reason | None:
        raise NotImplementedError

    def plan(self, m: BackwardMatch, g: Graph) -> BackwardPlan | Reason:
        """The planning core's answer for this match (its layer's layout)."""
        raise NotImplementedError

    def _common(self, m: BackwardMatch, g: Graph) -> Reason | None:
        reason = ref_attr_reason(m.producer) or self._axis_reason(m, g)
        if reason:
            return reason
        return g.intermediate_reason(m.tail.output[0], m.tail.op_type)

    def _axis_reason(self, m: BackwardMatch, g: Graph) -> Reason | None:
        """Conv, ConvTranspose and Gemm outputs have their channels on axis 1."""
        return m.norm.channel_axis_reason(f"{m.producer.op_type} output")

    @staticmethod
    def _reroute(m: BackwardMatch, g: Graph) -> None:
        """Make the absorbing node produce the normalization's output; drop the norm."""
        last = m.tail
        old = last.output[0]
        g.set_output(last, 0, m.norm.output)
        for n in m.norm.nodes:
            g.remove_node(n)
        g.drop_value_info([old])


class _ConvLikeBN(BackwardRule):
    """Conv and ConvTranspose: the layout (:func:`~bnfuse.onnx.rulebase.conv_layout`)
    says how the weight indexes output channels."""

    def _weights_reason(self, m: BackwardMatch, g: Graph) -> Reason | None:
        p = m.producer
        return (
            weight_reason(g, p, 1)
            or optional_const_reason(g, p, 2)
            or float_weight_reason(g, p.input[1])
        )

    def plan(self, m: BackwardMatch, g: Graph) -> BackwardPlan | Reason:
        p = m.producer
        layout = layout_of(m, lambda: conv_layout(p, g.const(p.input[1])))
        return plan_backward(layout, m.norm.affine, layer=p.op_type, norm=m.norm.kind)

    def prepare(self, m: BackwardMatch, g: Graph) -> Write:
        p = m.producer
        w = g.const(p.input[1])
        like = like_of(p, 2)
        w2, b2 = planned(self.plan(m, g), self.name).fold(
            w, bias_of(g, p, 2), weight_dtype=w.dtype, bias_dtype=dtype_of(g, like), lazy=True
        )

        def write() -> str:
            g.write_const(p, 1, w2, p.input[1], f"{p.input[1]}_bnfused")
            g.write_const(p, 2, b2, like, f"{node_label(p)}_bias_bnfused")
            self._reroute(m, g)
            return node_label(p)

        return write


class ConvBN(_ConvLikeBN):
    """Conv(x, W, b) then BN  ==  Conv(x, W*s[o], s*b + t)   (W: [C_out, C_in/g, k...])."""

    name = "conv-bn"
    ops = ("Conv",)


class ConvTransposeBN(_ConvLikeBN):
    """ConvTranspose then BN: scale W[C_in, C_out/g, k...] per output channel gi*(C_out/g)+j."""

    name = "conv-transpose-bn"
    ops = ("ConvTranspose",)


class GemmBN(BackwardRule):
    """alpha*A'B' + beta*C then BN  ==  alpha*A'(B' s[n]) + (beta*C*s + t), beta = 1."""

    name = "gemm-bn"
    ops = ("Gemm",)

    def _weights_reason(self, m: BackwardMatch, g: Graph) -> Reason | None:
        p = m.producer
        reason = (
            weight_reason(g, p, 1, "B")
            or optional_const_reason(g, p, 2)
            or float_weight_reason(g, p.input[1])
        )
        if not reason and g.const(p.input[1]).ndim != 2:
            return tagged("unsupported-layer", "Gemm B is not 2-D")
        return reason

    def plan(self, m: BackwardMatch, g: Graph) -> BackwardPlan | Reason:
        p = m.producer
        layout = layout_of(
            m, lambda: matrix_layout(g.const(p.input[1]), trans=bool(attr(p, "transB", 0)))
        )
        return plan_backward(layout, m.norm.affine, layer="Gemm", norm=m.norm.kind)

    def prepare(self, m: BackwardMatch, g: Graph) -> Write:
        p = m.producer
        b = g.const(p.input[1])
        plan = planned(self.plan(m, g), self.name)
        w2, _ = plan.fold(b, None, weight_dtype=b.dtype, lazy=True)
        c2 = gemm_bias_backward(bias_of(g, p, 2), float(attr(p, "beta", 1.0)), plan.affine)
        like = like_of(p, 2)
        c2 = g.rounded(c2, like)  # overflow refuses before any write

        def write() -> str:
            g.write_const(p, 1, w2, p.input[1], f"{p.input[1]}_bnfused")
            g.write_const(p, 2, c2, like, f"{node_label(p)}_C_bnfused")
            set_attr(p, "beta", 1.0)
            self._reroute(m, g)
            return node_label(p)

        return write


class MatMulBN(BackwardRule):
    """x @ W (+ b) then BN on the last axis  ==  x @ (W s[n]) + (s*b + t).

    Also through a Reshape that keeps the last axis (Keras exports a Dense on a rank-3
    input as Reshape -> MatMul -> Reshape): with equal last dimensions, an element's
    last-axis index is its flat index modulo that dimension on both sides, so a last-axis
    affine commutes with the Reshape.
    """

    name = "matmul-bn"
    ops = ("MatMul", "Add", "Reshape")

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> BackwardMatch | None:
        return _matmul_chain(norm, node, g)

    def _weights_reason(self, m: BackwardMatch, g: Graph) -> Reason | None:
        p = m.producer
        for n in (p, m.add, m.via):
            if n is not None and n is not m.tail:
                reason = g.intermediate_reason(n.output[0], n.op_type)
                if reason:
                    return reason
        reason = weight_reason(g, p, 1) or float_weight_reason(g, p.input[1])
        w = g.const(p.input[1]) if not reason else None
        if w is not None and w.ndim != 2:
            return tagged("unsupported-layer", f"MatMul weight is {w.ndim}-D, not 2-D")
        return reason

    def check(self, m: BackwardMatch, g: Graph) -> Reason | None:
        reason = super().check(m, g)
        if reason:
            return reason
        n = int(g.const(m.producer.input[1]).shape[1])
        if m.via is not None and m.norm.axis is not None:  # a scalar passes any Reshape
            reason = _reshape_reason(m.via, n, g)
            if reason:
                return reason
        return _add_bias_reason(m, n, g)

    def plan(self, m: BackwardMatch, g: Graph) -> BackwardPlan | Reason:
        layout = layout_of(m, lambda: matrix_layout(g.const(m.producer.input[1])))
        return plan_backward(layout, m.norm.affine, layer="MatMul", norm=m.norm.kind)

    def _axis_reason(self, m: BackwardMatch, g: Graph) -> Reason | None:
        # x @ W scales the LAST axis; any input rank works for a last-axis affine.
        norm = m.norm
        if norm.axis is not None and norm.rank is None:
            norm.rank = g.rank(norm.input)
        return norm.last_axis_reason("MatMul output", "the MatMul weight indexes the last axis")

    def prepare(self, m: BackwardMatch, g: Graph) -> Write:
        p = m.producer
        w = g.const(p.input[1])
        n = w.shape[1]
        bias = None
        if m.add is not None:
            bias = np.broadcast_to(g.const(_bias_name(m)).astype(np.float64).reshape(-1), (n,))
        # every value rounded (overflow checked) before any write
        name = _bias_name(m) if m.add is not None else p.input[1]
        w2, b2 = planned(self.plan(m, g), self.name).fold(
            w, bias, weight_dtype=w.dtype, bias_dtype=dtype_of(g, name), lazy=True
        )

        def write() -> str:
            g.write_const(p, 1, w2, p.input[1], f"{p.input[1]}_bnfused")
            done = m
            if m.add is not None:
                slot = list(m.add.input).index(name)
                g.write_const(m.add, slot, b2, name, f"{node_label(m.add)}_bias_bnfused")
            elif np.any(b2 != 0):
                stored = add_bias_after(p, b2, g)
                done = BackwardMatch(m.norm, p, stored, m.via, m.via or stored)
            self._reroute(done, g)
            return node_label(p)

        return write


def _matmul_chain(norm: Norm, node: onnx.NodeProto, g: Graph) -> BackwardMatch | None:
    """MatMul, then maybe an Add of a constant and a Reshape (either order), producing
    the norm's input: ``node``, the producer of that input, and the two nodes above it."""
    cur: onnx.NodeProto | None = node
    add = via = None
    for _ in range(3):
        if cur is None or cur.domain not in ("", "ai.onnx"):
            return None
        if cur.op_type == "MatMul":
            return BackwardMatch(norm, cur, add, via, node)
        if cur.op_type == "Add" and add is None and len(cur.input) == 2:
            consts = [i for i in (0, 1) if not g.const_reason(cur.input[i])]
            if len(consts) != 1:
                return None
            add = cur
            cur = g.producer.get(cur.input[1 - consts[0]])
        elif cur.op_type == "Reshape" and via is None and cur.input:
            via = cur
            cur = g.producer.get(cur.input[0])
        else:
            return None
    return None


def _add_bias_reason(m: BackwardMatch, n: int, g: Graph) -> Reason | None:
    """Why the MatMul's bias Add does not add one value per output channel (None: it
    does, or there is no Add)."""
    if m.add is None:
        return None
    b = g.const(_bias_name(m))
    rank = g.rank(m.add.output[0])
    if not per_channel_bias(b, n, rank if rank is not None else 1):
        return tagged(
            "axis-mismatch", f"Add bias of shape {list(b.shape)} is not per output channel"
        )
    return None


def _bias_name(m: BackwardMatch) -> str:
    """The constant input of the MatMul's bias Add."""
    add = m.add
    if add is None:
        raise FusionInvariantError("matmul-bn: no bias Add")
    src = (m.via if m.via is not None and m.via.output[0] in add.input else m.producer).output[0]
    return add.input[1] if add.input[0] == src else add.input[0]


def _reshape_reason(via: onnx.NodeProto, n: int, g: Graph) -> Reason | None:
    """Why the Reshape after a MatMul may not keep its last axis of ``n`` (None: it does)."""
    shape = g.shapes.get(via.output[0])
    last = shape[-1] if shape else None
    if not isinstance(last, int) and len(via.input) > 1 and not g.const_reason(via.input[1]):
        target = g.const(via.input[1]).reshape(-1)
        last = int(target[-1]) if target.size and int(target[-1]) > 0 else None
    if not isinstance(last, int):
        return tagged(
            "axis-mismatch", "cannot prove that the Reshape after the MatMul keeps the last axis"
        )
    if last != n:
        return tagged(
            "axis-mismatch", f"the Reshape after the MatMul changes the last axis ({n} -> {last})"
        )
    return None


BACKWARD_RULES: tuple[BackwardRule, ...] = (ConvBN(), ConvTransposeBN(), GemmBN(), MatMulBN())
