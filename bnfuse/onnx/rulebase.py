"""The one shape of an ONNX fold rule, and what the rules share.

A rule is a named object (``name``, ``direction``, ``doc``) with

* ``match(norm, node, g)``: the pattern. ``node`` is the normalization's neighbour on
  the rule's side (its producer for a backward rule, one of its consumers for a forward
  one); returns a match (the nodes involved) or None when the rule does not apply;
* ``check(m, g)``: None, or why the fold is refused (a :class:`~bnfuse.reasons.Reason`:
  the sentence with its code, given where the sentence is written);
* ``prepare(m, g)``: gathers the arrays, asks the planning core (:mod:`bnfuse.plan`) for
  the plan, computes and rounds every new value (an overflow raises
  :class:`OverflowError` here, before anything is written) and returns the write step,
  which writes them back and returns the name of the node that absorbed the fold;
* ``rewrite(m, g)``: ``prepare`` then write (what the driver calls for one target; for
  several targets it prepares them all first, so an overflow leaves none written).

The driver (:mod:`bnfuse.onnx.fuse`) enforces what every rule needs: the normalization
is a foldable per-channel affine with constant parameters, it is not excluded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import onnx

from bnfuse.errors import FusionInvariantError
from bnfuse.onnx.graph import FLOAT_TYPES, Graph, MalformedNodeError, attr, node_label
from bnfuse.onnx.norm import Norm
from bnfuse.plan import BackwardPlan, ForwardPlan, Layout
from bnfuse.reasons import Reason, tagged
from bnfuse.result import Direction

__all__ = [
    "BackwardMatch",
    "ForwardMatch",
    "Rule",
    "Write",
    "add_bias_after",
    "bias_of",
    "conv_groups",
    "conv_layout",
    "dtype_of",
    "float_weight_reason",
    "layout_of",
    "like_of",
    "matrix_layout",
    "optional_const_reason",
    "per_channel_bias",
    "planned",
    "ref_attr_reason",
    "weight_reason",
    "zero_padding",
]

#: The write step :meth:`Rule.prepare` returns: writes the prepared values, returns the
#: name of the node that absorbed the fold.
Write = Callable[[], str]

M = TypeVar("M")


class Rule(Generic[M]):
    """Base of every ONNX fold rule (see the module docstring for the protocol)."""

    name = ""
    direction: Direction = "backward"
    doc = ""

    def match(self, norm: Norm, node: onnx.NodeProto, g: Graph) -> M | None:
        raise NotImplementedError

    def check(self, m: M, g: Graph) -> Reason | None:
        raise NotImplementedError

    def prepare(self, m: M, g: Graph) -> Write:
        raise NotImplementedError

    def rewrite(self, m: M, g: Graph) -> str:
        """Apply the fold; return the name of the node that absorbed it."""
        return self.prepare(m, g)()


@dataclass
class BackwardMatch:
    """A linear ``producer`` (then maybe a bias Add and a Reshape), then the norm."""

    norm: Norm
    producer: onnx.NodeProto
    add: onnx.NodeProto | None = None  # MatMul's bias Add
    via: onnx.NodeProto | None = None  # a Reshape after the MatMul that keeps the last axis
    last: onnx.NodeProto | None = None  # the node producing the norm's input (default: above)
    layout: Layout | None = None  # the producer's, read once (see :func:`layout_of`)

    @property
    def tail(self) -> onnx.NodeProto:
        """The node whose output is the normalization's input."""
        return self.last or self.via or self.add or self.producer


@dataclass
class ForwardMatch:
    """The norm, then maybe ``via`` (a Flatten/Reshape, or a chain of layout ops), then
    the linear ``node``."""

    norm: Norm
    node: onnx.NodeProto  # the linear consumer
    via: onnx.NodeProto | None = None  # the node between that reads the norm's output
    scale_only: bool = False  # set by ``prepare``: a pure scale (the shift is zero)
    layout: Layout | None = None  # the layer's, read once (see :func:`layout_of`)

    @property
    def head(self) -> onnx.NodeProto:
        """The node that reads the normalization's output (rerouted to its input)."""
        return self.via if self.via is not None else self.node


# ---------------------------------------------------------------------------------------
# What the rules share: reading a node's constants, and its layout for the planning core
# ---------------------------------------------------------------------------------------


def weight_reason(g: Graph, node: onnx.NodeProto, slot: int, what: str = "weight") -> Reason | None:
    """Why ``node``'s input ``slot`` is no usable constant weight (None when it is)."""
    if slot >= len(node.input) or not node.input[slot]:
        return tagged("unsupported-layer", f"{node.op_type} has no {what}")
    reason = g.const_reason(node.input[slot])
    return reason.reworded(f"{node.op_type} {what} {reason}") if reason else None


def float_weight_reason(g: Graph, name: str) -> Reason | None:
    if g.const_dtype(name) not in FLOAT_TYPES:
        return tagged("dtype", f"weight {name!r} is not a floating-point tensor")
    return None


def optional_const_reason(g: Graph, node: onnx.NodeProto, slot: int) -> Reason | None:
    """Why an optional bias input is given but not constant (None when absent or constant)."""
    if slot < len(node.input) and node.input[slot]:
        reason = g.const_reason(node.input[slot])
        if reason:
            return reason.reworded(f"{node.op_type} bias {reason}")
    return None


def bias_of(g: Graph, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
    """The optional bias input ``slot`` in float64, or None when absent."""
    if slot < len(node.input) and node.input[slot]:
        return g.const(node.input[slot]).astype(np.float64)
    return None


def like_of(node: onnx.NodeProto, slot: int) -> str:
    """The constant whose element type a new value for input ``slot`` takes: that input,
    or the node's weight (input 1) when the slot is empty."""
    return node.input[slot] if len(node.input) > slot and node.input[slot] else node.input[1]


def dtype_of(g: Graph, name: str) -> np.dtype[Any]:
    """The numpy element type of constant ``name``."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(g.const_dtype(name)))


def ref_attr_reason(node: onnx.NodeProto) -> Reason | None:
    refs = [a.name for a in node.attribute if a.ref_attr_name]
    if refs:
        return tagged(
            "unsupported-layer",
            f"{node.op_type} {node_label(node)!r} takes attribute(s) {', '.join(refs)} "
            "from the enclosing function's call site",
        )
    return None


def conv_groups(node: onnx.NodeProto) -> int:
    groups = int(attr(node, "group", 1))
    if groups < 1:
        raise MalformedNodeError(f"{node.op_type} {node_label(node)!r} has group={groups}")
    return groups


def zero_padding(node: onnx.NodeProto) -> bool:
    """Does the Conv/ConvTranspose pad its input with zeros (explicit pads or auto_pad)?"""
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    pads = attr(node, "pads", None)
    return bool(pads) and any(int(p) != 0 for p in pads)


def conv_layout(node: onnx.NodeProto, w: np.ndarray) -> Layout:
    """Conv ``[C_out, C_in/g, k...]`` or ConvTranspose ``[C_in, C_out/g, k...]``."""
    transposed = node.op_type == "ConvTranspose"
    return Layout(
        shape=tuple(int(d) for d in w.shape),
        out_axes=(1,) if transposed else (0,),
        in_axes=(0,) if transposed else (1,),
        groups=conv_groups(node),
        transposed=transposed,
        pads_input=zero_padding(node),
    )


def matrix_layout(w: np.ndarray, trans: bool = False) -> Layout:
    """A 2-D weight ``[K, N]`` (MatMul, Gemm B), or ``[N, K]`` when ``trans`` (transB)."""
    return Layout(
        shape=tuple(int(d) for d in w.shape),
        out_axes=(0,) if trans else (1,),
        in_axes=(1,) if trans else (0,),
        dense=True,
    )


def layout_of(m: BackwardMatch | ForwardMatch, read: Callable[[], Layout]) -> Layout:
    """The layout of the match's layer, read (by ``read``) once: ``check`` and
    ``prepare`` both plan from it, and nothing changes the graph between them."""
    if m.layout is None:
        m.layout = read()
    return m.layout


P = TypeVar("P", BackwardPlan, ForwardPlan)


def planned(plan: P | Reason, rule: str) -> P:
    """The plan ``prepare`` asked for; a refusal there means ``check`` let through a
    fold it should have refused: a bnfuse bug."""
    if isinstance(plan, str):
        raise FusionInvariantError(f"{rule}: planned after check but refused: {plan}")
    return plan


def per_channel_bias(b: np.ndarray, n: int, max_rank: int) -> bool:
    """Is constant ``b`` one value per output channel of ``n`` (or one value for all),
    laid along the last axis of an output of rank ``max_rank``?"""
    return b.ndim <= max_rank and b.size in (1, n) and all(d == 1 for d in b.shape[:-1])


def add_bias_after(p: onnx.NodeProto, bias: np.ndarray, g: Graph) -> onnx.NodeProto:
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
