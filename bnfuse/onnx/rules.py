"""Fold rules for ONNX graphs.

Each rule states the identity it relies on, ``check`` returns None or a readable refusal
reason, and ``rewrite`` only gathers arrays, calls :mod:`bnfuse.fold`, and writes them back.
The driver (:mod:`bnfuse.onnx.fuse`) enforces what every rule needs: the normalization is
a foldable per-channel affine, its parameters are constants, it is not excluded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfuse.errors import FusionInvariantError
from bnfuse.fold import Affine, channel_map, checked_bn_affine, fold_backward, fold_forward
from bnfuse.onnx.graph import Graph, MalformedNodeError, attr, node_label, set_attr
from bnfuse.reasons import PADDING, TRANSPOSE_SHIFT

#: ``Norm.axis`` of an element-wise affine (see ``Norm.elem_shape``).
ELEMENTWISE = -(10**6)

__all__ = ["BACKWARD_RULES", "ELEMENTWISE", "FORWARD_RULES", "Norm", "bn_norm"]


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

    def elementwise_reason(self) -> str | None:
        """Why an element-wise affine cannot fold here (None for per-channel ones)."""
        if self.elem_shape is None:
            return None
        return (
            f"{self.kind} constant varies along several axes of its input "
            f"(shape {list(self.elem_shape)}): not a per-channel affine "
            "(only a Flatten into Gemm/MatMul can take it)"
        )

    def channel_axis_reason(self, what: str) -> str | None:
        """None when the affine acts on axis 1 (the NCHW channel / Gemm N axis)."""
        if self.elem_shape is not None:
            return self.elementwise_reason()
        if self.axis is None or self.axis == 1:
            return None
        where = f"a rank-{self.rank} {what}" if self.rank is not None else f"the {what}"
        last = " (the last axis)" if self.rank is not None and self.axis == self.rank - 1 else ""
        return f"{self.kind} {self.verb} axis {self.axis}{last} of {where}, not its channel axis 1"

    def last_axis_reason(self, what: str, uses: str) -> str | None:
        """None when the affine acts on the last axis of its tensor (or is a scalar)."""
        if self.elem_shape is not None:
            return self.elementwise_reason()
        if self.axis is None:
            return None
        if self.rank is None:
            return f"cannot prove the {what} rank (no shape information)"
        if self.axis != self.rank - 1:
            return (
                f"{self.kind} {self.verb} axis {self.axis} of a rank-{self.rank} {what}, but {uses}"
            )
        return None


def bn_norm(node: onnx.NodeProto, g: Graph, opset: int) -> Norm | str:
    """The affine of a BatchNormalization node, or why it cannot be folded at all."""
    if len(node.input) < 5:
        return "malformed BatchNormalization (fewer than 5 inputs)"
    extra = [o for o in node.output[1:] if o]
    if extra:
        return "BatchNormalization training outputs (running mean/var) are used"
    if attr(node, "training_mode", 0):
        return "BatchNormalization is in training mode (training_mode=1)"
    if opset < 7 and attr(node, "is_test", 0) == 0:
        return "BatchNormalization is in training mode (is_test=0)"
    for p in node.input[1:5]:
        reason = g.const_reason(p)
        if reason:
            return f"BN parameter {reason}"
    scale, bias, mean, var = (g.const(p).astype(np.float64) for p in node.input[1:5])
    eps = float(attr(node, "epsilon", 1e-5))
    if opset < 9 and attr(node, "spatial", 1) == 0 and mean.ndim > 1:
        return "BatchNormalization with spatial=0 normalizes every element, not per channel"
    if not all(a.ndim <= 1 for a in (scale, bias, mean, var)):
        return "BN parameters are not per-channel vectors"
    n = mean.size
    if not all(a.size == n for a in (scale, bias, var)):
        return "BN parameters have different lengths"
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


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _weight(g: Graph, node: onnx.NodeProto, slot: int, what: str = "weight") -> str | None:
    if slot >= len(node.input) or not node.input[slot]:
        return f"{node.op_type} has no {what}"
    reason = g.const_reason(node.input[slot])
    return f"{node.op_type} {what} {reason}" if reason else None


def _float_weight(g: Graph, name: str) -> str | None:
    from bnfuse.onnx.graph import FLOAT_TYPES

    if g.const_dtype(name) not in FLOAT_TYPES:
        return f"weight {name!r} is not a floating-point tensor"
    return None


def _optional_const(g: Graph, node: onnx.NodeProto, slot: int) -> str | None:
    if slot < len(node.input) and node.input[slot]:
        reason = g.const_reason(node.input[slot])
        if reason:
            return f"{node.op_type} bias {reason}"
    return None


def _bias(g: Graph, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
    if slot < len(node.input) and node.input[slot]:
        return g.const(node.input[slot]).astype(np.float64)
    return None


def _channels_mismatch(norm: Norm, n: int, what: str) -> str | None:
    if norm.channels != n and norm.channels != 1:
        return f"{norm.kind} has {norm.channels} channels but {what} has {n}"
    return None


def _affine_n(norm: Norm, n: int) -> Affine:
    if norm.channels == n:
        return norm.affine
    return Affine(np.full(n, norm.affine.scale[0]), np.full(n, norm.affine.shift[0]))


def _ref_attr_reason(node: onnx.NodeProto) -> str | None:
    refs = [a.name for a in node.attribute if a.ref_attr_name]
    if refs:
        return (
            f"{node.op_type} {node_label(node)!r} takes attribute(s) {', '.join(refs)} "
            "from the enclosing function's call site"
        )
    return None


def _conv_groups(node: onnx.NodeProto) -> int:
    groups = int(attr(node, "group", 1))
    if groups < 1:
        raise MalformedNodeError(f"{node.op_type} {node_label(node)!r} has group={groups}")
    return groups


def _zero_padding(node: onnx.NodeProto) -> bool:
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    pads = attr(node, "pads", None)
    return bool(pads) and any(int(p) != 0 for p in pads)


def _group_view(shape: tuple[int, ...], groups: int) -> tuple[int, ...] | None:
    """A grouped Conv/ConvTranspose weight split into its groups along axis 0
    ([g, C0/g, C1, k...]), where channel maps broadcast without a full-size copy; None
    for one group (the weight's own shape does)."""
    return (groups, shape[0] // groups, *shape[1:]) if groups > 1 else None


def _grouped_map(shape: tuple[int, ...], groups: int, axis: int) -> np.ndarray:
    """Channel of every element of a Conv/ConvTranspose weight ``[C0, C1, k...]`` along
    its ``axis`` 0 or 1, counted across the ``groups`` groups, broadcastable to
    :func:`_group_view` (to the weight itself for one group).

    Axis 0 holds the channel itself: axes (0, 1) of the group view. Axis 1 holds the
    channel within the element's group gi: gi*C1 + j, axes (0, 2) of the group view.
    Conv ``[C_out, C_in/g, k...]``: output channel axis 0, input channel axis 1;
    ConvTranspose ``[C_in, C_out/g, k...]``: input channel axis 0, output channel axis 1.
    """
    view = _group_view(shape, groups)
    if view is None:
        return channel_map(shape, (axis,))
    return channel_map(view, (0, axis + 1))


# ---------------------------------------------------------------------------------------
# Backward rules: linear producer, then the normalization
# ---------------------------------------------------------------------------------------


@dataclass
class BackwardMatch:
    norm: Norm
    producer: onnx.NodeProto
    add: onnx.NodeProto | None = None  # MatMul's bias Add
    via: onnx.NodeProto | None = None  # a Reshape after the MatMul that keeps the last axis
    last: onnx.NodeProto | None = None  # the node producing the norm's input (default: above)

    @property
    def tail(self) -> onnx.NodeProto:
        """The node whose output is the normalization's input."""
        return self.last or self.via or self.add or self.producer


class BackwardRule:
    """Base class: the normalization's input is produced by one of ``ops``."""

    name = ""
    ops: tuple[str, ...] = ()
    doc = ""

    def match(self, norm: Norm, g: Graph) -> BackwardMatch | None:
        prod = g.producer.get(norm.input)
        if prod is None or prod.op_type not in self.ops or prod.domain not in ("", "ai.onnx"):
            return None
        return BackwardMatch(norm, prod)

    def check(self, m: BackwardMatch, g: Graph) -> str | None:
        raise NotImplementedError

    def rewrite(self, m: BackwardMatch, g: Graph) -> str:
        """Apply the fold; return the name of the node that absorbed it."""
        raise NotImplementedError

    def _common(self, m: BackwardMatch, g: Graph) -> str | None:
        reason = _ref_attr_reason(m.producer) or self._axis_reason(m, g)
        if reason:
            return reason
        return g.intermediate_reason(m.tail.output[0], m.tail.op_type)

    def _axis_reason(self, m: BackwardMatch, g: Graph) -> str | None:
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
    """Shared check/rewrite of Conv and ConvTranspose: subclasses say how the weight
    indexes output channels."""

    def out_channels(self, w: np.ndarray, groups: int) -> int:
        raise NotImplementedError

    def out_map(self, w: np.ndarray, groups: int) -> np.ndarray:
        """Output channel of every weight element, broadcastable to :meth:`view`."""
        raise NotImplementedError

    def view(self, w: np.ndarray, groups: int) -> tuple[int, ...] | None:
        """The reshape of the weight :meth:`out_map` broadcasts to (None: its own shape)."""
        return None

    def layout_reason(self, w: np.ndarray, groups: int) -> str | None:
        return None

    def check(self, m: BackwardMatch, g: Graph) -> str | None:
        p = m.producer
        reason = (
            self._common(m, g)
            or _weight(g, p, 1)
            or _optional_const(g, p, 2)
            or _float_weight(g, p.input[1])
        )
        if reason:
            return reason
        w = g.const(p.input[1])
        groups = _conv_groups(p)
        return self.layout_reason(w, groups) or _channels_mismatch(
            m.norm, self.out_channels(w, groups), f"{p.op_type} output"
        )

    def rewrite(self, m: BackwardMatch, g: Graph) -> str:
        p = m.producer
        w = g.const(p.input[1])
        groups = _conv_groups(p)
        aff = _affine_n(m.norm, self.out_channels(w, groups))
        w2, b2 = fold_backward(
            w,
            _bias(g, p, 2),
            aff,
            self.out_map(w, groups),
            weight_dtype=w.dtype,
            lazy=True,
            view=self.view(w, groups),
        )
        like = p.input[2] if len(p.input) > 2 and p.input[2] else p.input[1]
        b2 = g.rounded(b2, like)  # every value rounded (overflow checked) before any write
        g.write_const(p, 1, w2, p.input[1], f"{p.input[1]}_bnfused")
        g.write_const(p, 2, b2, like, f"{node_label(p)}_bias_bnfused")
        self._reroute(m, g)
        return node_label(p)


class ConvBN(_ConvLikeBN):
    """Conv(x, W, b) then BN  ==  Conv(x, W*s[o], s*b + t)   (W: [C_out, C_in/g, k...])."""

    name = "conv-bn"
    ops = ("Conv",)

    def out_channels(self, w: np.ndarray, groups: int) -> int:
        return int(w.shape[0])

    def out_map(self, w: np.ndarray, groups: int) -> np.ndarray:
        return channel_map(w.shape, (0,))


class ConvTransposeBN(_ConvLikeBN):
    """ConvTranspose then BN: scale W[C_in, C_out/g, k...] per output channel gi*(C_out/g)+j."""

    name = "conv-transpose-bn"
    ops = ("ConvTranspose",)

    def out_channels(self, w: np.ndarray, groups: int) -> int:
        return int(w.shape[1]) * groups

    def out_map(self, w: np.ndarray, groups: int) -> np.ndarray:
        return _grouped_map(w.shape, groups, 1)

    def view(self, w: np.ndarray, groups: int) -> tuple[int, ...] | None:
        return _group_view(w.shape, groups)

    def layout_reason(self, w: np.ndarray, groups: int) -> str | None:
        if w.shape[0] % groups:
            return (
                f"ConvTranspose weight has {w.shape[0]} input channels, "
                f"not divisible by group={groups}"
            )
        return None


class GemmBN(BackwardRule):
    """alpha*A'B' + beta*C then BN  ==  alpha*A'(B' s[n]) + (beta*C*s + t), beta = 1."""

    name = "gemm-bn"
    ops = ("Gemm",)

    def check(self, m: BackwardMatch, g: Graph) -> str | None:
        p = m.producer
        reason = (
            self._common(m, g)
            or _weight(g, p, 1, "B")
            or _optional_const(g, p, 2)
            or _float_weight(g, p.input[1])
        )
        if reason:
            return reason
        b = g.const(p.input[1])
        if b.ndim != 2:
            return "Gemm B is not 2-D"
        n = b.shape[0] if attr(p, "transB", 0) else b.shape[1]
        return _channels_mismatch(m.norm, n, "Gemm output")

    def rewrite(self, m: BackwardMatch, g: Graph) -> str:
        p = m.producer
        b = g.const(p.input[1])
        trans_b = int(attr(p, "transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        aff = _affine_n(m.norm, n)
        out_axis = 0 if trans_b else 1
        w2, _ = fold_backward(
            b, None, aff, channel_map(b.shape, (out_axis,)), weight_dtype=b.dtype, lazy=True
        )
        beta = float(attr(p, "beta", 1.0))
        c = _bias(g, p, 2)
        c2 = aff.shift if c is None else beta * c * aff.scale + aff.shift
        like = p.input[2] if len(p.input) > 2 and p.input[2] else p.input[1]
        c2 = g.rounded(np.asarray(c2), like)  # overflow refuses before any write
        g.write_const(p, 1, w2, p.input[1], f"{p.input[1]}_bnfused")
        g.write_const(p, 2, c2, like, f"{node_label(p)}_C_bnfused")
        set_attr(p, "beta", 1.0)
        self._reroute(m, g)
        return node_label(p)


class MatMulBN(BackwardRule):
    """x @ W (+ b) then BN on the last axis  ==  x @ (W s[n]) + (s*b + t).

    Also through a Reshape that keeps the last axis (Keras exports a Dense on a rank-3
    input as Reshape -> MatMul -> Reshape): with equal last dimensions, an element's
    last-axis index is its flat index modulo that dimension on both sides, so a last-axis
    affine commutes with the Reshape.
    """

    name = "matmul-bn"
    ops = ("MatMul", "Add", "Reshape")

    def match(self, norm: Norm, g: Graph) -> BackwardMatch | None:
        first = cur = g.producer.get(norm.input)
        add = via = None
        for _ in range(3):
            if cur is None or cur.domain not in ("", "ai.onnx"):
                return None
            if cur.op_type == "MatMul":
                return BackwardMatch(norm, cur, add, via, first)
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

    def check(self, m: BackwardMatch, g: Graph) -> str | None:
        p = m.producer
        reason = self._common(m, g)
        if reason:
            return reason
        for n in (p, m.add, m.via):
            if n is not None and n is not m.tail:
                reason = g.intermediate_reason(n.output[0], n.op_type)
                if reason:
                    return reason
        reason = _weight(g, p, 1) or _float_weight(g, p.input[1])
        if reason:
            return reason
        w = g.const(p.input[1])
        if w.ndim != 2:
            return f"MatMul weight is {w.ndim}-D, not 2-D"
        reason = _channels_mismatch(m.norm, w.shape[1], "MatMul output")
        if reason:
            return reason
        if m.via is not None and m.norm.axis is not None:  # a scalar passes any Reshape
            reason = self._reshape_reason(m.via, int(w.shape[1]), g)
            if reason:
                return reason
        if m.add is not None:
            b = g.const(self._bias_name(m))
            rank = g.rank(m.add.output[0])
            limit = rank if rank is not None else 1
            per_channel = b.size in (1, w.shape[1]) and all(d == 1 for d in b.shape[:-1])
            if b.ndim > limit or not per_channel:
                return f"Add bias of shape {list(b.shape)} is not per output channel"
        return None

    @staticmethod
    def _reshape_reason(via: onnx.NodeProto, n: int, g: Graph) -> str | None:
        shape = g.shapes.get(via.output[0])
        last = shape[-1] if shape else None
        if not isinstance(last, int) and len(via.input) > 1 and not g.const_reason(via.input[1]):
            target = g.const(via.input[1]).reshape(-1)
            last = int(target[-1]) if target.size and int(target[-1]) > 0 else None
        if not isinstance(last, int):
            return "cannot prove that the Reshape after the MatMul keeps the last axis"
        if last != n:
            return f"the Reshape after the MatMul changes the last axis ({n} -> {last})"
        return None

    def _axis_reason(self, m: BackwardMatch, g: Graph) -> str | None:
        # x @ W scales the LAST axis; any input rank works for a last-axis affine.
        norm = m.norm
        if norm.axis is not None and norm.rank is None:
            norm.rank = g.rank(norm.input)
        return norm.last_axis_reason("MatMul output", "the MatMul weight indexes the last axis")

    @staticmethod
    def _bias_name(m: BackwardMatch) -> str:
        add = m.add
        if add is None:
            raise FusionInvariantError("matmul-bn: no bias Add")
        src = (m.via if m.via is not None and m.via.output[0] in add.input else m.producer).output[
            0
        ]
        return add.input[1] if add.input[0] == src else add.input[0]

    def rewrite(self, m: BackwardMatch, g: Graph) -> str:
        p = m.producer
        w = g.const(p.input[1])
        n = w.shape[1]
        aff = _affine_n(m.norm, n)
        bias = None
        if m.add is not None:
            bias = np.broadcast_to(g.const(self._bias_name(m)).astype(np.float64).reshape(-1), (n,))
        w2, b2 = fold_backward(
            w, bias, aff, channel_map(w.shape, (1,)), weight_dtype=w.dtype, lazy=True
        )
        # every value rounded (overflow checked) before any write
        name = self._bias_name(m) if m.add is not None else p.input[1]
        b2 = g.rounded(b2, name)
        g.write_const(p, 1, w2, p.input[1], f"{p.input[1]}_bnfused")
        if m.add is not None:
            slot = list(m.add.input).index(name)
            g.write_const(m.add, slot, b2, name, f"{node_label(m.add)}_bias_bnfused")
        elif np.any(b2 != 0):
            stored = _add_bias_after(p, b2, g)
            m = BackwardMatch(m.norm, p, stored, m.via, m.via or stored)
        self._reroute(m, g)
        return node_label(p)


def _add_bias_after(p: onnx.NodeProto, bias: np.ndarray, g: Graph) -> onnx.NodeProto:
    """Give a MatMul a bias: ``p`` now writes a fresh name, read by a new ``Add(that,
    bias)`` that produces ``p``'s old output. ``bias`` is already rounded to the weight's
    type. Returns the stored Add."""
    bias_name = g.add_const(bias, f"{node_label(p)}_bias_bnfused", g.const_dtype(p.input[1]))
    mid = g.names.new(f"{p.output[0]}_matmul")
    add = onnx.helper.make_node(
        "Add", [mid, bias_name], [p.output[0]], name=g.names.new(f"{node_label(p)}_bias_add")
    )
    g.set_output(p, 0, mid)
    return g.insert_after(p, add)


BACKWARD_RULES: tuple[BackwardRule, ...] = (ConvBN(), ConvTransposeBN(), GemmBN(), MatMulBN())


# ---------------------------------------------------------------------------------------
# Forward rules: the normalization, then a linear consumer
# ---------------------------------------------------------------------------------------

PAD_REASON = PADDING  # one wording for every backend (bnfuse/reasons.py)


@dataclass
class ForwardTarget:
    node: onnx.NodeProto  # the linear consumer
    via: onnx.NodeProto | None = None  # Flatten / Reshape in between
    flat: Affine | None = None  # the affine per flattened feature (through ``via``)
    scale_only: bool = False


class ForwardRule:
    """Fold a normalization into every linear consumer of its output."""

    name = ""
    doc = ""

    def target(self, norm: Norm, consumer: onnx.NodeProto, g: Graph) -> ForwardTarget | str | None:
        """A target for this consumer, a refusal reason, or None when the rule does not apply."""
        raise NotImplementedError

    def rewrite(self, norm: Norm, t: ForwardTarget, g: Graph, dry: bool = False) -> None:
        """Apply the fold to this target. Every new value is computed and rounded (an
        overflow raises OverflowError) before the first write; ``dry`` stops there."""
        raise NotImplementedError


class BNConv(ForwardRule):
    """BN then Conv without padding: Conv(s*x + t) == Conv_{W s[i]}(x) + sum W t[i]."""

    name = "bn-conv"

    def target(self, norm: Norm, c: onnx.NodeProto, g: Graph) -> ForwardTarget | str | None:
        if c.op_type not in ("Conv", "ConvTranspose") or c.domain not in ("", "ai.onnx"):
            return None
        if c.input[0] != norm.output or list(c.input).count(norm.output) != 1:
            return f"{norm.kind} output feeds {c.op_type} {node_label(c)!r} as a weight"
        reason = (
            norm.channel_axis_reason(f"{c.op_type} input")
            or _ref_attr_reason(c)
            or _weight(g, c, 1)
            or _optional_const(g, c, 2)
            or _float_weight(g, c.input[1])
        )
        if reason:
            return reason
        w = g.const(c.input[1])
        groups = _conv_groups(c)
        if w.ndim < 2 or w.shape[0] % groups:
            which = "output" if c.op_type == "Conv" else "input"
            return (
                f"{c.op_type} weight of shape {list(w.shape)}: its {which} channels do not "
                f"divide into group={groups}"
            )
        cin = w.shape[1] * groups if c.op_type == "Conv" else w.shape[0]
        reason = _channels_mismatch(norm, cin, f"{c.op_type} input")
        if reason:
            return reason
        shift_zero = bool(np.all(norm.affine.shift == 0))
        if c.op_type == "ConvTranspose" and not shift_zero:
            return TRANSPOSE_SHIFT
        if _zero_padding(c) and not shift_zero:
            return PAD_REASON
        return ForwardTarget(c, scale_only=shift_zero)

    def rewrite(self, norm: Norm, t: ForwardTarget, g: Graph, dry: bool = False) -> None:
        c = t.node
        w = g.const(c.input[1])
        groups = _conv_groups(c)
        if c.op_type == "Conv":
            cout = w.shape[0]
            aff = _affine_n(norm, w.shape[1] * groups)
            in_map, out_map = _grouped_map(w.shape, groups, 1), _grouped_map(w.shape, groups, 0)
        else:
            cout = w.shape[1] * groups
            aff = _affine_n(norm, w.shape[0])
            in_map, out_map = _grouped_map(w.shape, groups, 0), _grouped_map(w.shape, groups, 1)
        w2, b2 = fold_forward(
            w,
            _bias(g, c, 2),
            aff,
            in_map,
            out_map,
            cout,
            weight_dtype=w.dtype,
            lazy=True,
            view=_group_view(w.shape, groups),
        )
        has_bias = len(c.input) > 2 and bool(c.input[2])
        like = c.input[2] if has_bias else c.input[1]
        b2 = g.rounded(b2, like)  # every value rounded (overflow checked) before any write
        if dry:
            return
        g.write_const(c, 1, w2, c.input[1], f"{c.input[1]}_bnfused")
        if has_bias or np.any(b2 != 0):
            g.write_const(c, 2, b2, like, f"{node_label(c)}_bias_bnfused")


class BNGemm(ForwardRule):
    """BN then Gemm/MatMul (optionally via Flatten): rows of the weight scale by s; bias += t·W."""

    name = "bn-gemm"

    def target(self, norm: Norm, c: onnx.NodeProto, g: Graph) -> ForwardTarget | str | None:
        via = None
        flat: Affine | None = None
        if c.op_type in ("Flatten", "Reshape") and c.domain in ("", "ai.onnx"):
            via = c
            flat_or_reason = self._flatten_affine(norm, c, g)
            if isinstance(flat_or_reason, str):
                return flat_or_reason
            flat = flat_or_reason
            nxt = g.only_consumer(c.output[0])
            if nxt is None:
                reason = g.intermediate_reason(c.output[0], c.op_type)
                return reason or f"{c.op_type} output has no consumer"
            c = nxt
        if c.op_type not in ("Gemm", "MatMul") or c.domain not in ("", "ai.onnx"):
            return (
                None
                if via is None
                else f"{via.op_type} is followed by {c.op_type}, not Gemm/MatMul"
            )
        src = via.output[0] if via is not None else norm.output
        if c.input[0] != src or list(c.input).count(src) != 1:
            return f"{norm.kind} output feeds {c.op_type} {node_label(c)!r} as its weight"
        if c.op_type == "Gemm" and attr(c, "transA", 0):
            return "Gemm transposes its input (transA=1): BN channel axis is not the reduced axis"
        reason = _ref_attr_reason(c) or _weight(g, c, 1) or _float_weight(g, c.input[1])
        if c.op_type == "Gemm":
            reason = reason or _optional_const(g, c, 2)
        if reason:
            return reason
        w = g.const(c.input[1])
        if w.ndim != 2:
            return f"{c.op_type} weight is not 2-D"
        if via is None and norm.elem_shape is not None:
            return norm.elementwise_reason()
        if via is None and norm.axis is not None:
            # Gemm takes a 2-D input; MatMul with a 2-D weight reduces the LAST axis of an
            # input of any rank, so a last-axis affine (or scalar) folds into its rows.
            rank = norm.rank if norm.rank is not None else g.rank(norm.input)
            if rank is None:
                return f"cannot prove the rank of the {c.op_type} input (no shape information)"
            if (c.op_type == "Gemm" and rank != 2) or norm.axis != rank - 1:
                return (
                    f"{norm.kind} {norm.verb} axis {norm.axis} of a rank-{rank} tensor but "
                    f"{c.op_type} reduces over the last axis"
                )
        k = w.shape[1] if (c.op_type == "Gemm" and attr(c, "transB", 0)) else w.shape[0]
        n_in = flat.channels if flat is not None else norm.channels
        if n_in != k and (flat is not None or norm.channels != 1):
            return f"{norm.kind} gives {n_in} features but {c.op_type} takes {k}"
        return ForwardTarget(c, via=via, flat=flat)

    @staticmethod
    def _flatten_affine(norm: Norm, c: onnx.NodeProto, g: Graph) -> Affine | str:
        """The affine per flattened feature: s, t broadcast over the input's non-batch
        dims (static shape needed), then raveled in row-major order as Flatten does."""
        shape = g.shapes.get(norm.input)
        if shape is None or len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
            return f"cannot prove the {c.op_type} feature order (unknown input shape)"
        feat_shape = tuple(int(d) for d in shape[1:])  # type: ignore[arg-type]
        feat = math.prod(feat_shape)
        if c.op_type == "Flatten":
            if int(attr(c, "axis", 1)) != 1:
                return "Flatten axis is not 1"
        else:  # Reshape: must produce [N, prod(dims)]
            if g.const_reason(c.input[1]):
                return "Reshape shape is not a constant"
            target = [int(v) for v in g.const(c.input[1]).reshape(-1)]
            ok = (
                len(target) == 2
                and target[1] in (-1, feat)
                and target[0] in (0, -1, shape[0])
                and not (target[0] == -1 and target[1] != feat)
            )
            if not ok:
                return f"Reshape to {target} is not a provable flatten"
        rank = len(shape)
        if norm.elem_shape is not None:
            if len(norm.elem_shape) != rank or norm.elem_shape[0] != 1:
                return f"{norm.kind} constant of shape {list(norm.elem_shape)} varies along the batch axis"
            bshape: tuple[int, ...] = norm.elem_shape[1:]
        elif norm.axis is None:
            bshape = (1,) * (rank - 1)
        else:
            if not 1 <= norm.axis < rank:
                return f"{norm.kind} {norm.verb} axis {norm.axis} of a rank-{rank} tensor (the batch axis)"
            if norm.channels not in (1, feat_shape[norm.axis - 1]):
                return (
                    f"{norm.kind} has {norm.channels} channels but axis {norm.axis} of its input "
                    f"has {feat_shape[norm.axis - 1]}"
                )
            dims = [1] * (rank - 1)
            dims[norm.axis - 1] = norm.channels
            bshape = tuple(dims)
        try:
            scale = np.broadcast_to(norm.affine.scale.reshape(bshape), feat_shape).reshape(-1)
            shift = np.broadcast_to(norm.affine.shift.reshape(bshape), feat_shape).reshape(-1)
        except ValueError:
            return f"{norm.kind} does not broadcast over the {c.op_type} input {list(feat_shape)}"
        return Affine(scale, shift)

    def rewrite(self, norm: Norm, t: ForwardTarget, g: Graph, dry: bool = False) -> None:
        c = t.node
        w = g.const(c.input[1])
        trans_b = c.op_type == "Gemm" and int(attr(c, "transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        k, n = w.shape[in_axis], w.shape[out_axis]
        aff = t.flat if t.flat is not None else _affine_n(norm, k)
        w2, tw = fold_forward(
            w,
            None,
            aff,
            channel_map(w.shape, (in_axis,)),
            channel_map(w.shape, (out_axis,)),
            n,
            weight_dtype=w.dtype,
            lazy=True,
        )
        # plan the bias, every value rounded (overflow checked) before anything is written
        write_bias: Callable[[], None] | None = None
        if c.op_type == "Gemm":
            alpha = float(attr(c, "alpha", 1.0))
            beta = float(attr(c, "beta", 1.0))
            cb = _bias(g, c, 2)
            c2 = alpha * tw if cb is None else beta * cb + alpha * tw
            if cb is not None or np.any(c2 != 0):
                like = c.input[2] if len(c.input) > 2 and c.input[2] else c.input[1]
                c2r = g.rounded(np.asarray(c2), like)

                def write_bias() -> None:
                    g.write_const(c, 2, c2r, like, f"{node_label(c)}_C_bnfused")
                    set_attr(c, "beta", 1.0)

        elif np.any(tw != 0):
            write_bias = self._matmul_bias(c, tw, n, g)
        if dry:
            return
        g.write_const(c, 1, w2, c.input[1], f"{c.input[1]}_bnfused")
        if write_bias is not None:
            write_bias()

    @staticmethod
    def _matmul_bias(c: onnx.NodeProto, tw: np.ndarray, n: int, g: Graph) -> Callable[[], None]:
        """How to add ``tw`` to a MatMul's output: into the constant of the Add after it,
        or through a new Add. The values are rounded here; the returned call writes."""
        add = g.only_consumer(c.output[0])
        if add is not None and add.op_type == "Add":
            slot = 1 if add.input[0] == c.output[0] else 0
            bname = add.input[slot]
            if not g.const_reason(bname):
                b = g.const(bname)
                out_rank = g.rank(add.output[0]) or 1
                per_channel = b.ndim <= out_rank and all(d == 1 for d in b.shape[:-1])
                if per_channel and b.size in (1, n):
                    b64 = np.broadcast_to(b.astype(np.float64).reshape(-1), (n,)) + tw
                    new_b = g.rounded(b64.reshape(b.shape if b.size == n else (n,)), bname)

                    def into_add() -> None:
                        g.write_const(add, slot, new_b, bname, f"{node_label(add)}_bias_bnfused")

                    return into_add
        twr = g.rounded(tw, c.input[1])

        def new_add() -> None:
            _add_bias_after(c, twr, g)

        return new_add


FORWARD_RULES: tuple[ForwardRule, ...] = (BNConv(), BNGemm())
