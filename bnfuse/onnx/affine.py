"""BN in disguise: constant per-channel affines (``Mul``/``Add``/``Sub``/``Div`` by a constant).

Keras 3's exporter and the TF converters emit an inference BatchNormalization as
``Mul(y, s)`` then ``Add(., t)`` with constants ``s``, ``t``. A chain of such nodes is one
affine ``z = s·y + t`` per channel, which the ordinary BN rules fold, provided the constants
broadcast along exactly one axis of the tensor (or are scalars). That axis is proven from
the constant's shape and the tensor's rank, never guessed: a ``[C]`` constant on a 4-D
Conv output varies along the last (W) axis, not along the channels.

Identities (x the tensor, c the constant, per channel)::

    Mul(x, c) = c·x          Add(x, c) = x + c          Div(x, c) = (1/c)·x   (c ≠ 0)
    Sub(x, c) = x + (−c)     Sub(c, x) = (−1)·x + c     Div(c, x): not affine in x

What is reported (folded, or refused with a reason):

- a chain with a scale (``Mul``/``Div``) and a shift (``Add``/``Sub``), at least one of
  them per-channel (one axis, more than one channel): a BN in disguise wherever it sits;
- any other chain (a lone per-channel ``Mul`` or ``Add``, as an exporter writes a BN with
  ``scale=False`` / ``center=False``; scalars) only next to a linear layer: its tensor comes
  from a Conv, ConvTranspose, Gemm or MatMul with a stored weight, possibly through other
  affines, BNs and layout ops (Reshape, Squeeze, Unsqueeze, Transpose, Identity), or its
  result feeds one the same way (or through a Flatten).

So a residual ``Add`` of two activations, or a scalar ``Mul`` far from any layer, is never
reported. An ``Add`` right after a MatMul is that MatMul's bias (the ``matmul-bn`` rule
folds into it), not a normalization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfuse.fold import Affine
from bnfuse.onnx.graph import FLOAT_TYPES, Graph, node_label
from bnfuse.onnx.norm import ELEMENTWISE, Norm
from bnfuse.reasons import Reason, tagged

__all__ = ["AFFINE_OPS", "LINEAR_OPS", "Step", "affine_norm", "step_of"]

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: layout ops the layout-bn / layout-forward rules see through (bnfuse/onnx/layout.py)
_LAYOUT = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")
_PASS_BACK = ("BatchNormalization", *_LAYOUT)
_PASS_FORWARD = ("BatchNormalization", "Flatten", *_LAYOUT)
_MAX_WALK = 32


@dataclass(frozen=True)
class Step:
    """One node applying a constant per-channel affine to its tensor input ``x``."""

    node: onnx.NodeProto
    x: str
    const: str
    affine: Affine  # 1 element for a scalar, else one per channel
    axis: int | None  # None: a scalar (the same on every element); ELEMENTWISE: see below
    rank: int | None
    elem_shape: tuple[int, ...] | None = None  # element-wise: constant shape aligned to rank


def _default(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def step_of(node: onnx.NodeProto, g: Graph) -> Step | Reason | None:
    """The affine ``node`` applies to its non-constant input.

    Returns a :class:`Step`, a reason when the node is a Mul/Add/Sub/Div by a stored
    tensor that is not a per-channel affine, or None when the node is no such op at all
    (two computed inputs, two constants, ``Div(c, x)``, integer arithmetic).
    """
    if node.op_type not in AFFINE_OPS or not _default(node):
        return None
    if len(node.input) != 2 or len(node.output) != 1 or not all(node.input):
        return None
    a, b = node.input
    ka, kb = g.stored_weight(a), g.stored_weight(b)
    if ka == kb:
        return None
    x, c = (b, a) if ka else (a, b)
    op = node.op_type
    if op == "Div" and ka:
        return None  # c / x is not affine in x
    reason = g.const_reason(c)
    if reason:
        return reason.reworded(f"{op} operand {reason}")
    if g.const_dtype(c) not in FLOAT_TYPES:
        return None
    value = g.const(c)
    rank = g.rank(x)
    shape = [int(d) for d in value.shape]
    axis: int | None = None
    if value.size == 1:
        if value.ndim > (rank if rank is not None else 1):
            return tagged(
                "axis-mismatch",
                f"{op} constant of shape {shape} has more dimensions than its input "
                f"({_rank_text(rank)}): it would broadcast the input",
            )
    else:
        if rank is None:
            return tagged(
                "axis-mismatch",
                f"cannot prove which axis the {op} constant of shape {shape} applies to "
                f"(rank of {x!r} unknown)",
            )
        if value.ndim > rank:
            return tagged(
                "axis-mismatch",
                f"{op} constant of shape {shape} has more dimensions than its rank-{rank} "
                "input: it would broadcast the input",
            )
        aligned = [1] * (rank - value.ndim) + shape
        varying = [i for i, d in enumerate(aligned) if d != 1]
        xshape = g.shapes.get(x)
        if (
            len(varying) > 1
            and 0 not in varying
            and xshape is not None
            and all(isinstance(xshape[i], int) and xshape[i] == aligned[i] for i in varying)
        ):
            elem = _elementwise_affine(op, value, bool(ka))
            if isinstance(elem, str):
                return elem
            return Step(node, x, c, elem, ELEMENTWISE, rank, tuple(aligned))
        if len(varying) > 1:
            return tagged(
                "axis-mismatch",
                f"{op} constant of shape {shape} varies along axes {varying} of its "
                f"rank-{rank} input: not a per-channel affine",
            )
        axis = varying[0]
        xshape = g.shapes.get(x)
        if xshape is not None and isinstance(xshape[axis], int) and xshape[axis] != value.size:
            return tagged(
                "axis-mismatch",
                f"{op} constant of shape {shape} broadcasts axis {axis} of its input "
                f"(size {xshape[axis]}): not a per-channel affine",
            )
    vec = value.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(vec)):
        return tagged("unsafe-statistics", f"{op} constant is not finite (NaN or Inf)")
    ones, zeros = np.ones_like(vec), np.zeros_like(vec)
    if op == "Mul":
        aff = Affine(vec, zeros)
    elif op == "Add":
        aff = Affine(ones, vec)
    elif op == "Sub":
        aff = Affine(ones, -vec) if not ka else Affine(-ones, vec)
    else:  # Div(x, c)
        if np.any(vec == 0):
            return tagged("unsafe-statistics", "Div by a constant that contains 0")
        with np.errstate(over="ignore"):  # a reciprocal too large is refused just below
            aff = Affine(1.0 / vec, zeros)
    if not (np.all(np.isfinite(aff.scale)) and np.all(np.isfinite(aff.shift))):
        return tagged("unsafe-statistics", f"{op} constant gives a non-finite affine")
    return Step(node, x, c, aff, axis, rank)


def _elementwise_affine(op: str, value: np.ndarray, const_first: bool) -> Affine | Reason:
    vec = value.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(vec)):
        return tagged("unsafe-statistics", f"{op} constant is not finite (NaN or Inf)")
    ones, zeros = np.ones_like(vec), np.zeros_like(vec)
    if op == "Mul":
        return Affine(vec, zeros)
    if op == "Add":
        return Affine(ones, vec)
    if op == "Sub":
        return Affine(-ones, vec) if const_first else Affine(ones, -vec)
    if np.any(vec == 0):
        return tagged("unsafe-statistics", "Div by a constant that contains 0")
    return Affine(1.0 / vec, zeros)


def _rank_text(rank: int | None) -> str:
    return "rank unknown" if rank is None else f"rank {rank}"


def _is_linear(node: onnx.NodeProto, g: Graph) -> bool:
    return (
        node.op_type in LINEAR_OPS
        and _default(node)
        and len(node.input) >= 2
        and g.stored_weight(node.input[1])
    )


def _is_matmul_bias(node: onnx.NodeProto, g: Graph) -> bool:
    """An ``Add`` of a stored tensor right after a MatMul layer (or after the Reshape that
    follows one, as in Keras's export of a Dense layer on a rank-3 input): its bias."""
    if node.op_type != "Add" or not _default(node) or len(node.input) != 2:
        return False
    for i in (0, 1):
        prod = g.producer.get(node.input[i])
        if prod is not None and prod.op_type == "Reshape" and _default(prod) and prod.input:
            prod = g.producer.get(prod.input[0])
        if prod is not None and prod.op_type == "MatMul" and _is_linear(prod, g):
            return g.stored_weight(node.input[1 - i])
    return False


def _non_const_input(node: onnx.NodeProto, g: Graph) -> str | None:
    ins = [i for i in node.input if i]
    if node.op_type in _PASS_BACK:
        return ins[0] if ins else None
    if node.op_type in AFFINE_OPS and len(ins) == 2:
        a, b = ins
        ka, kb = g.stored_weight(a), g.stored_weight(b)
        if ka != kb:
            return b if ka else a
    return None


def near_linear(x: str, out: str, g: Graph) -> bool:
    """Is a linear layer right before ``x`` or right after ``out``?

    Other affines and BatchNormalizations in between count as "right" (they fold in
    turn); a Flatten/Reshape is looked through after the node (forward folds use it).
    """
    name = x
    for _ in range(_MAX_WALK):
        prod = g.producer.get(name)
        if prod is None or not _default(prod):
            break
        if _is_linear(prod, g):
            return True
        nxt = _non_const_input(prod, g) if prod.op_type in (*AFFINE_OPS, *_PASS_BACK) else None
        if nxt is None:
            break
        name = nxt
    frontier = [out]
    for _ in range(_MAX_WALK):
        following: list[str] = []
        for name in frontier:
            for c in g.consumers.get(name, []):
                if not _default(c):
                    continue
                if _is_linear(c, g) and c.input[0] == name:
                    return True
                if c.op_type in _PASS_FORWARD and c.input and c.input[0] == name:
                    following.extend(o for o in c.output[:1] if o)
                elif c.op_type in AFFINE_OPS and _non_const_input(c, g) == name:
                    following.append(c.output[0])
        if not following:
            break
        frontier = following
    return False


def _prev_step(step: Step, g: Graph) -> Step | None:
    """The step right before ``step`` in the same chain, if any."""
    prod = g.producer.get(step.x)
    if prod is None or g.only_consumer(step.x) is not step.node:
        return None
    prev = step_of(prod, g)
    if not isinstance(prev, Step) or _is_matmul_bias(prod, g):
        return None
    return prev


def _compatible(axis: int | None, n: int, st: Step, elem: tuple[int, ...] | None) -> bool:
    scalar = st.axis is None and st.affine.channels == 1
    if elem is not None or st.elem_shape is not None:
        # element-wise chains take scalars and constants of the very same shape
        chain_scalar = axis is None and n == 1
        return scalar or st.elem_shape == elem or (chain_scalar and st.elem_shape is not None)
    if st.axis is not None and axis is not None and st.axis != axis:
        return False
    m = st.affine.channels
    return m == 1 or n == 1 or m == n


def _chain_from(head: Step, g: Graph) -> list[Step]:
    """The longest chain of single-consumer steps starting at ``head`` on one axis."""
    steps = [head]
    axis, n, elem = head.axis, head.affine.channels, head.elem_shape
    while True:
        out = steps[-1].node.output[0]
        nxt = g.only_consumer(out)
        if nxt is None:
            break
        st = step_of(nxt, g)
        if not isinstance(st, Step) or st.x != out or not _compatible(axis, n, st, elem):
            break
        steps.append(st)
        elem = elem if elem is not None else st.elem_shape
        axis = axis if axis is not None else st.axis
        n = max(n, st.affine.channels)
    return steps


def _chain_containing(st: Step, g: Graph) -> list[Step] | None:
    """The chain (see :func:`_chain_from`) that ``st`` belongs to."""
    head = st
    for _ in range(len(g.g.node)):
        prev = _prev_step(head, g)
        if prev is None:
            break
        head = prev
    while True:
        chain = _chain_from(head, g)
        if any(s.node is st.node for s in chain):
            return chain
        nxt = g.only_consumer(chain[-1].node.output[0])
        following = step_of(nxt, g) if nxt is not None else None
        if not isinstance(following, Step):
            return None  # unreachable for a well-formed walk; stay silent rather than loop
        head = following


def bn_pair(chain: list[Step]) -> bool:
    """A BN in disguise wherever it sits: a scale (Mul/Div) and a shift (Add/Sub) by
    constants in one chain, at least one of them per-channel along one axis with more
    than one channel. Scalar-only chains (``x*0.5 + 0.5`` in an activation) and
    element-wise constants are not; those, and lone per-channel steps, are listed only
    next to a linear layer (:func:`near_linear`)."""
    ops = {s.node.op_type for s in chain}
    per_channel = any(
        s.axis is not None and s.axis != ELEMENTWISE and s.affine.channels > 1 for s in chain
    )
    return bool(ops & {"Mul", "Div"}) and bool(ops & {"Add", "Sub"}) and per_channel


def affine_norm(node: onnx.NodeProto, g: Graph, opset: int) -> Norm | Reason | None:
    """NORM_FINDER: the affine chain that starts at ``node``, a reason, or None.

    None for every node that is not the first of a chain (the first one speaks for the
    chain), for a MatMul's bias ``Add``, and for anything not next to a linear layer.
    """
    del opset  # Mul/Add/Sub/Div broadcast the same way in every opset >= 7
    if node.op_type not in AFFINE_OPS or not _default(node):
        return None
    if _is_matmul_bias(node, g):
        return None
    st = step_of(node, g)
    if st is None:
        return None
    if isinstance(st, str):
        x = _non_const_input(node, g)
        if x is None or not near_linear(x, node.output[0], g):
            return None
        return st
    chain = _chain_containing(st, g)
    if chain is None or chain[0].node is not node:
        return None
    if not near_linear(chain[0].x, chain[-1].node.output[0], g) and not bn_pair(chain):
        return None
    aff = chain[0].affine
    axis = chain[0].axis
    elem = chain[0].elem_shape
    for s in chain[1:]:
        aff = aff.then(s.affine)
        axis = axis if axis is not None else s.axis
        elem = elem if elem is not None else s.elem_shape
    return Norm(
        name=node_label(node),
        kind="+".join(s.node.op_type for s in chain),
        nodes=[s.node for s in chain],
        input=chain[0].x,
        output=chain[-1].node.output[0],
        affine=aff,
        axis=axis,
        rank=chain[0].rank,
        params=[s.const for s in chain],
        elem_shape=elem,
    )


def _listed(st: Step, x: str, g: Graph) -> bool:
    if near_linear(x, st.node.output[0], g):
        return True
    chain = _chain_containing(st, g)
    return chain is not None and bn_pair(chain)
