"""Seeing a normalization's channel axis through layout ops between it and its layer.

Keras's Conv1D reaches ONNX (tf2onnx) as ``Unsqueeze -> Transpose -> Conv -> Squeeze``,
with its BN as ``Mul -> Add`` after the Squeeze, or before the next Unsqueeze; NHWC
exports put a ``Transpose`` between a Conv and its BN. A per-channel affine commutes with
an op that only moves elements when the op carries the affine's axis onto one axis of its
other side: ``L(s·x + t) == s'·L(x) + t'`` with ``s'``, ``t'`` the same vectors laid along
the mapped axis. The rules here walk such a chain, map the axis op by op, and hand the
normalization, restated on the layer's side of the chain, to the ordinary rules.

Layout ops and the axis map (output axis ``j`` <- input axis ``i``), each proved from the
op's attributes, constant inputs and static shapes, never guessed:

- ``Identity``: ``i = j``.
- ``Transpose(perm)``: ``i = perm[j]`` (no ``perm``: reversed axes, the rank must be known).
- ``Squeeze(axes)``: ``j`` is the j-th kept input axis (no ``axes``: the input shape must be
  static, to know which axes have size 1).
- ``Unsqueeze(axes)``: ``i = j - #{a in axes: a < j}``; a new axis holds no channels.
- ``Reshape``: input axis ``i`` and output axis ``j`` correspond when both have the same
  static size and the same static number of elements after them (then an element's index
  along them is ``(flat // after) % size`` on both sides); other axes do not.

Where the map fails the fold is refused with the reason. Every intermediate tensor of the
chain must have the next op as its only reader (the chain is kept, only the weights change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import onnx

from bnfuse.onnx.backward import BACKWARD_RULES, BackwardRule
from bnfuse.onnx.forward import FORWARD_RULES, ForwardRule
from bnfuse.onnx.graph import Graph, attr, node_label
from bnfuse.onnx.norm import Norm
from bnfuse.onnx.rulebase import BackwardMatch, ForwardMatch, Write
from bnfuse.reasons import Reason, tagged

__all__ = [
    "LAYOUT_BACKWARD_RULES",
    "LAYOUT_FORWARD_RULES",
    "LAYOUT_OPS",
    "LayoutBN",
    "LayoutForward",
    "map_axis",
]

LAYOUT_OPS = ("Identity", "Transpose", "Squeeze", "Unsqueeze", "Reshape")
#: Longest chain of layout ops walked.
_MAX_CHAIN = 8
#: Layers (and Flatten, which bn-gemm reads through) a forward chain may end at.
_FORWARD_ENDS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Flatten", "Reshape")


def is_layout(node: onnx.NodeProto | None) -> bool:
    """A default-domain layout op with a data input."""
    return (
        node is not None
        and node.op_type in LAYOUT_OPS
        and node.domain in ("", "ai.onnx")
        and bool(node.input)
        and bool(node.input[0])
    )


def _ints(g: Graph, node: onnx.NodeProto, name: str, slot: int) -> list[int] | Reason | None:
    """An int list given as attribute ``name`` (older opsets) or constant input ``slot``."""
    value = attr(node, name, None)
    if value is not None:
        return [int(v) for v in value]
    if slot < len(node.input) and node.input[slot]:
        reason = g.const_reason(node.input[slot])
        if reason:
            return reason.reworded(f"{node.op_type} {name} {reason}")
        return [int(v) for v in g.const(node.input[slot]).reshape(-1)]
    return None


def _static(shape: tuple[int | str | None, ...] | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _rank(g: Graph, name: str) -> int | None:
    r = g.rank(name)
    if r is None:
        shape = g.shapes.get(name)
        r = len(shape) if shape is not None else None
    return r


def _pairs(g: Graph, node: onnx.NodeProto) -> dict[int, int] | Reason:
    """Output axis -> input axis for every axis ``node`` carries (see the module doc)."""
    op, x = node.op_type, node.input[0]
    label = f"{op} {node_label(node)!r}"
    if op == "Identity":
        r = _rank(g, x)
        if r is None:
            return tagged("axis-mismatch", f"cannot prove the rank of the {label} input")
        return {j: j for j in range(r)}
    if op == "Transpose":
        perm = attr(node, "perm", None)
        if perm is None:
            r = _rank(g, x)
            if r is None:
                return tagged(
                    "axis-mismatch",
                    f"cannot prove the rank of the {label} input (Transpose without perm)",
                )
            perm = list(reversed(range(r)))
        return {j: int(p) for j, p in enumerate(perm)}
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints(g, node, "axes", 1)
        if isinstance(axes, str):
            return axes
        r_in = _rank(g, x)
        if op == "Squeeze":
            if axes is None:
                shape = _static(g.shapes.get(x))
                if shape is None:
                    return tagged(
                        "axis-mismatch",
                        f"cannot prove which axes {label} removes (input shape not static)",
                    )
                axes = [i for i, d in enumerate(shape) if d == 1]
                r_in = len(shape)
            if r_in is None:
                return tagged("axis-mismatch", f"cannot prove the rank of the {label} input")
            gone = {a + r_in if a < 0 else a for a in axes}
            kept = [i for i in range(r_in) if i not in gone]
            return dict(enumerate(kept))
        if axes is None or r_in is None:
            return tagged("axis-mismatch", f"cannot prove the axes {label} adds")
        r_out = r_in + len(axes)
        new = {a + r_out if a < 0 else a for a in axes}
        old = [j for j in range(r_out) if j not in new]
        return {j: i for i, j in enumerate(old)}
    return _reshape_pairs(g, node, label)


def _reshape_pairs(g: Graph, node: onnx.NodeProto, label: str) -> dict[int, int] | Reason:
    x, y = node.input[0], node.output[0]
    sin, sout = g.shapes.get(x), g.shapes.get(y)
    if sin is None or sout is None:
        return tagged("axis-mismatch", f"cannot prove the shapes around {label}")
    pairs: dict[int, int] = {}
    for j, dj in enumerate(sout):
        if not isinstance(dj, int) or dj == 1:
            continue
        after_j = _static(sout[j + 1 :])
        if after_j is None:
            continue
        for i, di in enumerate(sin):
            after_i = _static(sin[i + 1 :])
            if di == dj and after_i is not None and math.prod(after_i) == math.prod(after_j):
                pairs[j] = i
                break
    return pairs


def map_axis(g: Graph, node: onnx.NodeProto, axis: int, forward: bool) -> int | Reason:
    """The axis on the other side of layout op ``node``: input -> output when ``forward``,
    else output -> input; a reason when the op does not carry ``axis`` onto one axis."""
    pairs = _pairs(g, node)
    if isinstance(pairs, str):
        return pairs
    if forward:
        inverse = {i: j for j, i in pairs.items()}
        found = inverse.get(axis)
    else:
        found = pairs.get(axis)
    if found is None:
        side = "input" if forward else "output"
        return tagged(
            "axis-mismatch",
            f"{node.op_type} {node_label(node)!r} does not keep axis {axis} of its {side} "
            "as one axis: cannot prove where the channels go",
        )
    return found


def _restate(norm: Norm, chain: list[onnx.NodeProto], g: Graph, forward: bool) -> Norm | Reason:
    """``norm`` moved across ``chain`` (in walking order), acting on the far tensor."""
    if norm.elem_shape is not None:
        return tagged(
            "axis-mismatch",
            f"{norm.kind} constant varies along several axes: it does not move through "
            f"{chain[0].op_type}",
        )
    far = chain[-1].output[0] if forward else chain[-1].input[0]
    axis = norm.axis
    if axis is not None:
        if norm.rank is None:
            norm.rank = _rank(g, norm.input)
        if norm.rank is not None and axis < 0:
            axis += norm.rank
        for node in chain:
            mapped = map_axis(g, node, axis, forward)
            if isinstance(mapped, str):
                return mapped
            axis = mapped
    ops = ", ".join(dict.fromkeys(n.op_type for n in chain))
    return replace(
        norm,
        kind=f"{norm.kind} (through {ops})",  # reasons of the inner rules say where
        nodes=[],
        input=far,
        output=far,
        axis=axis,
        params=[],
        rank=_rank(g, far),
    )


# ---------------------------------------------------------------------------------------
# Backward: layer -> layout ops -> normalization
# ---------------------------------------------------------------------------------------


@dataclass
class LayoutMatch(BackwardMatch):
    chain: list[onnx.NodeProto] = field(default_factory=list)  # from the norm upward
    inner_rule: BackwardRule | None = None
    inner: BackwardMatch | None = None
    moved: Norm | Reason | None = None


class LayoutBN(BackwardRule):
    """layer -> layout ops -> affine  ==  layer' -> layout ops: the affine, restated on the
    layer's output axis, folds into the layer by the ordinary backward rules."""

    name = "layout-bn"
    ops = LAYOUT_OPS
    doc = "a BN after Squeeze/Unsqueeze/Transpose/Reshape of a layer's output"

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> BackwardMatch | None:
        chain: list[onnx.NodeProto] = []
        cur: onnx.NodeProto | None = node
        while cur is not None and is_layout(cur) and len(chain) < _MAX_CHAIN:
            chain.append(cur)
            cur = g.producer.get(cur.input[0])
        if not chain or cur is None:
            return None
        probe = replace(norm, nodes=[], input=chain[-1].input[0], output=chain[-1].input[0])
        for rule in BACKWARD_RULES:
            inner = rule.match(probe, cur, g)
            if inner is not None:
                moved = _restate(norm, chain, g, forward=False)
                return LayoutMatch(
                    norm, inner.producer, chain=chain, inner_rule=rule, inner=inner, moved=moved
                )
        return None

    def check(self, m: BackwardMatch, g: Graph) -> Reason | None:
        lm = _layout_match(m)
        if lm.moved is None or isinstance(lm.moved, str):
            return lm.moved or tagged("other", "layout-bn: the normalization was not restated")
        for node in lm.chain:
            reason = g.intermediate_reason(node.output[0], node.op_type)
            if reason:
                return reason
        inner, rule = _inner(lm)
        inner.norm = lm.moved
        return rule.check(inner, g)

    def prepare(self, m: BackwardMatch, g: Graph) -> Write:
        lm = _layout_match(m)
        inner, rule = _inner(lm)
        write_inner = rule.prepare(inner, g)

        def write() -> str:
            into = write_inner()  # weights; the layer keeps writing the same tensor
            last = lm.chain[0]
            old = last.output[0]
            g.set_output(last, 0, lm.norm.output)
            for n in lm.norm.nodes:
                g.remove_node(n)
            g.drop_value_info([old])
            return into

        return write


def _layout_match(m: BackwardMatch) -> LayoutMatch:
    if not isinstance(m, LayoutMatch):
        raise TypeError("layout-bn: not a layout match")
    return m


def _inner(lm: LayoutMatch) -> tuple[BackwardMatch, BackwardRule]:
    if lm.inner is None or lm.inner_rule is None:
        raise TypeError("layout-bn: no inner match")
    return lm.inner, lm.inner_rule


# ---------------------------------------------------------------------------------------
# Forward: normalization -> layout ops -> layer
# ---------------------------------------------------------------------------------------


@dataclass
class LayoutForwardMatch(ForwardMatch):
    moved: Norm | Reason | None = None  # the norm restated on the layer's side, or why not
    inner_rule: ForwardRule | None = None
    inner: ForwardMatch | None = None


class LayoutForward(ForwardRule):
    """affine -> layout ops -> layer  ==  layout ops -> layer': the affine, restated on the
    layer's input axis, folds into the layer by the ordinary forward rules."""

    name = "layout-forward"
    doc = "a BN before Squeeze/Unsqueeze/Transpose/Reshape into a layer"

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> ForwardMatch | None:
        if not is_layout(node) or node.input[0] != norm.output or _flattens(node, g):
            return None
        chain = [node]
        nxt = g.only_consumer(node.output[0])
        while nxt is not None and is_layout(nxt) and len(chain) < _MAX_CHAIN:
            if _flattens(nxt, g):
                break  # a Reshape into Gemm/MatMul: bn-gemm reads it as a flatten
            chain.append(nxt)
            nxt = g.only_consumer(nxt.output[0])
        if nxt is None or nxt.op_type not in _FORWARD_ENDS or nxt.domain not in ("", "ai.onnx"):
            return None
        moved = _restate(norm, chain, g, forward=True)
        if isinstance(moved, str):
            return LayoutForwardMatch(norm, nxt, chain[0], moved=moved)
        for rule in FORWARD_RULES:
            inner = rule.match(moved, nxt, g)
            if inner is not None:
                return LayoutForwardMatch(
                    norm, inner.node, chain[0], moved=moved, inner_rule=rule, inner=inner
                )
        return None

    def check(self, m: ForwardMatch, g: Graph) -> Reason | None:
        lm = _forward_match(m)
        if isinstance(lm.moved, str):
            return lm.moved
        inner, rule = _inner_forward(lm)
        return rule.check(inner, g)

    def prepare(self, m: ForwardMatch, g: Graph) -> Write:
        lm = _forward_match(m)
        inner, rule = _inner_forward(lm)
        write = rule.prepare(inner, g)
        lm.scale_only = inner.scale_only
        return write


def _forward_match(m: ForwardMatch) -> LayoutForwardMatch:
    if not isinstance(m, LayoutForwardMatch):
        raise TypeError("layout-forward: not a layout match")
    return m


def _inner_forward(lm: LayoutForwardMatch) -> tuple[ForwardMatch, ForwardRule]:
    if lm.inner is None or lm.inner_rule is None:
        raise TypeError("layout-forward: no inner match")
    return lm.inner, lm.inner_rule


def _flattens(node: onnx.NodeProto, g: Graph) -> bool:
    """A Reshape read only by a Gemm/MatMul: the bn-gemm rule's flatten, not a layout op."""
    after = g.only_consumer(node.output[0])
    return node.op_type == "Reshape" and after is not None and after.op_type in ("Gemm", "MatMul")


LAYOUT_BACKWARD_RULES: tuple[BackwardRule, ...] = (LayoutBN(),)
LAYOUT_FORWARD_RULES: tuple[ForwardRule, ...] = (LayoutForward(),)
