"""Constants the graph computes: a weight, bias or BN parameter made by a small subgraph.

Exporters often write a layer's parameter as a computation on constants rather than as an
initializer: PyTorch's dynamo exporter gives a Conv without bias the bias
``Expand(CastLike(Constant 0, x), Shape(...))``; other exporters put BN parameters behind
``Identity`` or ``Cast`` chains. Such a tensor is a constant when every leaf of the
subgraph that produces it is one:

- an initializer (not one also listed as a graph input, unless
  ``--treat-initializer-inputs-as-constants``), a ``Constant`` node, an outer-scope
  constant;
- ``Shape``/``Size`` of a tensor whose shape is static (only its shape is read);
- the second input of ``CastLike``, when its element type is known (only its type is read).

Such a subgraph is evaluated once, node by node, with ONNX's own reference implementation
(:mod:`onnx.reference`): bnfuse writes no op semantics of its own. Only pure,
deterministic ops are evaluated (:data:`EVALUABLE_OPS`), at most :data:`MAX_NODES` nodes,
and no tensor larger than :data:`MAX_ELEMENTS` elements (an ``Expand`` or
``ConstantOfShape`` is checked before it runs). Anything else stays "not a constant",
with the reason naming the op.

Nothing is rewritten here: the value is cached on the graph index, a fold that uses it
writes a new initializer into the folded node's input (:meth:`Graph.write_const`), and
:func:`prune` removes the computing nodes that nothing reads any more at the end of the
pass. bnfuse is not a general simplifier: computed tensors no fold used are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx

from bnfuse.reasons import Reason, tagged


class Graph(Protocol):
    """What this module reads and edits of a graph index (:class:`bnfuse.onnx.graph.Graph`,
    which calls into this module and so is named here by its shape, not imported)."""

    g: onnx.GraphProto
    treat_initializer_inputs_as_constants: bool
    shapes: Mapping[str, tuple[int | str | None, ...]]
    function: bool
    types: Mapping[str, int]
    opset: int
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    inits: dict[str, onnx.TensorProto]
    input_names: set[str]
    output_names: set[str]
    computed: Computed

    @property
    def outer(self) -> Graph | None: ...

    def const(self, name: str) -> np.ndarray: ...

    def const_dtype(self, name: str) -> int: ...

    def const_reason(self, name: str) -> Reason | None: ...

    def _dims(self, name: str) -> tuple[int, ...]: ...

    def reindex(self) -> None: ...

    def remove_node(self, node: onnx.NodeProto) -> None: ...

    def drop_value_info(self, names: Iterable[str]) -> None: ...

    def remove_unused_initializers(
        self, candidates: Iterable[str], reindex: bool = True
    ) -> None: ...


__all__ = [
    "EVALUABLE_OPS",
    "MAX_ELEMENTS",
    "MAX_NODES",
    "Computed",
    "computable",
    "computed_reason",
    "prune",
]

#: Pure, deterministic ops with no graph attributes that a computed constant may use.
EVALUABLE_OPS = frozenset(
    {
        # layout and bookkeeping
        "Identity", "Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze", "Expand",
        "Shape", "Size", "Concat", "Gather", "GatherElements", "Slice", "Transpose",
        "Flatten", "Tile", "Split", "ConstantOfShape", "Range", "Where",
        # element-wise arithmetic and comparisons
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Exp",
        "Log", "Max", "Min", "Sum", "Mean", "Clip", "Floor", "Ceil", "Round", "Sign",
        "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or",
        # reductions
        "ReduceSum", "ReduceMean", "ReduceProd", "ReduceMax", "ReduceMin",
    }
)  # fmt: skip

#: Most nodes a computed constant's subgraph may have.
MAX_NODES = 64
#: Most elements of any tensor in such a subgraph (a large weight behind a Cast still fits).
MAX_ELEMENTS = 1 << 26

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Computed:
    """The per-graph cache: values and reasons of tensors asked about, and the names of
    the tensors inside the subgraphs that produced them (candidates for :func:`prune`)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    reasons: dict[str, Reason] = field(default_factory=dict)
    inner: set[str] = field(default_factory=set)
    structure: dict[str, bool] = field(default_factory=dict)  # see computable()


class _NotConstant(Exception):
    """Raised inside the walk: the reason the tensor is not a computable constant."""


def computed_reason(g: Graph, name: str) -> Reason | None:
    """None when ``name`` (produced by a node that is not ``Constant``) is a constant
    this module can compute, its value then in ``g.computed.values``; else why not."""
    cache = g.computed
    if name in cache.values:
        return None
    if name in cache.reasons:
        return cache.reasons[name]
    prod = g.producer[name]
    try:
        order = _subgraph(g, name)
        env = _evaluate(g, order)
    except _NotConstant as exc:
        reason = tagged(
            "not-constant", f"{name!r} is computed by a {prod.op_type} node, not a constant ({exc})"
        )
        cache.reasons[name] = reason
        return reason
    cache.values[name] = env[name]
    cache.inner.update(o for n in order for o in n.output if o)
    return None


def computable(g: Graph, name: str) -> bool:
    """Whether ``name`` is computed from stored tensors only (initializers, overridable
    ones included, and Constant nodes) by ops this module evaluates: decided from the
    graph's structure alone, without evaluating (and so without reading any weight)."""
    cache = g.computed
    if name in cache.values:
        return True
    if name not in cache.structure:
        try:
            _subgraph(g, name, stored=True)
            cache.structure[name] = True
        except _NotConstant:
            cache.structure[name] = False
    return cache.structure[name]


def _leaf(g: Graph, name: str, stored: bool = False) -> bool:
    """A tensor the walk stops at: stored in this graph or an enclosing one (``stored``:
    an initializer also listed as a graph input counts too)."""
    if name in g.inits:
        return stored or name not in g.input_names or g.treat_initializer_inputs_as_constants
    prod = g.producer.get(name)
    if prod is not None:
        return prod.op_type == "Constant" and g.const_reason(name) is None
    return g.outer is not None and name not in g.input_names and g.outer.const_reason(name) is None


def _subgraph(g: Graph, name: str, stored: bool = False) -> list[onnx.NodeProto]:
    """The nodes computing ``name`` from leaves, in evaluation order; raises _NotConstant."""
    order: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack: list[tuple[str, bool]] = [(name, False)]
    while stack:
        cur, done = stack.pop()
        prod = g.producer.get(cur)
        if done:
            if prod is not None and all(prod is not n for n in order):
                order.append(prod)
            continue
        if cur in seen or _leaf(g, cur, stored):
            continue
        seen.add(cur)
        if prod is None:
            what = "a function input" if g.function else "a graph input"
            if cur in g.inits:
                what = "an initializer also listed as a graph input (overridable)"
            raise _NotConstant(f"it depends on {cur!r}, {what}")
        if prod.domain not in _DEFAULT_DOMAINS or prod.op_type not in EVALUABLE_OPS:
            raise _NotConstant(
                f"it depends on a {prod.op_type} node, an op bnfuse does not evaluate"
            )
        if any(a.ref_attr_name for a in prod.attribute):
            raise _NotConstant(f"{prod.op_type} takes attributes from a function call site")
        if len(seen) > MAX_NODES:
            raise _NotConstant(f"its subgraph has more than {MAX_NODES} nodes")
        stack.append((cur, True))
        for i, inp in enumerate(prod.input):
            if not inp or _read_only_for_metadata(prod, i):
                continue
            stack.append((inp, False))
    return order


def _read_only_for_metadata(node: onnx.NodeProto, slot: int) -> bool:
    """Inputs whose values are never read: Shape/Size read a shape, CastLike a type."""
    return (node.op_type in ("Shape", "Size") and slot == 0) or (
        node.op_type == "CastLike" and slot == 1
    )


def _value(g: Graph, env: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name in env:
        return env[name]
    return np.asarray(g.const(name))


def _static_shape(g: Graph, env: dict[str, np.ndarray], name: str) -> tuple[int, ...]:
    if name in env:
        return tuple(env[name].shape)
    if _leaf(g, name):
        return tuple(int(d) for d in g._dims(name))
    shape = g.shapes.get(name)
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _NotConstant(f"Shape of {name!r}, whose shape is not static")
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _elem_type(g: Graph, env: dict[str, np.ndarray], name: str) -> np.dtype:
    if name in env:
        return env[name].dtype
    if _leaf(g, name):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(g.const_dtype(name)))
    t = g.types.get(name)
    if not t:
        raise _NotConstant(f"CastLike to {name!r}, whose element type is unknown")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t))


def _evaluate(g: Graph, order: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    env: dict[str, np.ndarray] = {}
    for node in order:
        if node.op_type in ("Shape", "Size"):
            shape = _static_shape(g, env, node.input[0])
            env[node.output[0]] = _shape_value(node, shape)
            continue
        feeds: dict[str, np.ndarray] = {}
        for i, inp in enumerate(node.input):
            if not inp or inp in feeds:
                continue
            if node.op_type == "CastLike" and i == 1:
                feeds[inp] = np.zeros((0,), _elem_type(g, env, inp))  # only its type is read
            else:
                feeds[inp] = _value(g, env, inp)
        _precheck(node, feeds)
        outs = _run_node(g, node, feeds)
        for o, v in zip(node.output, outs, strict=False):
            if not o:
                continue
            v = np.asarray(v)
            if v.size > MAX_ELEMENTS:
                raise _NotConstant(f"{node.op_type} gives {v.size} elements, over {MAX_ELEMENTS}")
            env[o] = v
    return env


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """Shape (with its ``start``/``end`` clamped as the ONNX spec says) or Size."""
    if node.op_type == "Size":
        return np.array(math.prod(shape), dtype=np.int64)
    r = len(shape)
    start, end = 0, r
    for a in node.attribute:
        if a.name == "start":
            start = int(a.i)
        elif a.name == "end":
            end = int(a.i)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return np.array(shape[start:end], dtype=np.int64)


def _precheck(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> None:
    """Refuse ops that would build a tensor over the cap before they run."""
    ins = [feeds.get(i) if i else None for i in node.input]
    size: int | None = None
    try:
        if node.op_type == "Expand" and len(ins) == 2 and ins[0] is not None and ins[1] is not None:
            target = [int(d) for d in ins[1].reshape(-1)]
            size = math.prod(np.broadcast_shapes(ins[0].shape, tuple(max(d, 1) for d in target)))
        elif node.op_type == "ConstantOfShape" and ins and ins[0] is not None:
            size = math.prod(int(d) for d in ins[0].reshape(-1))
        elif node.op_type == "Tile" and len(ins) == 2 and ins[0] is not None and ins[1] is not None:
            size = ins[0].size * math.prod(int(d) for d in ins[1].reshape(-1))
        elif node.op_type == "Range" and all(v is not None for v in ins[:3]) and len(ins) >= 3:
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in ins[:3])  # type: ignore[union-attr]
            size = max(math.ceil((limit - start) / delta), 0) if delta else None
    except (ValueError, OverflowError):
        size = None  # let the evaluator report it
    if size is not None and size > MAX_ELEMENTS:
        raise _NotConstant(f"{node.op_type} would give {size} elements, over {MAX_ELEMENTS}")


def _run_node(g: Graph, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One node through :class:`onnx.reference.ReferenceEvaluator` (ONNX's semantics)."""
    from onnx.reference import ReferenceEvaluator

    inputs = []
    for name, v in feeds.items():
        try:
            elem = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
        except (KeyError, ValueError, TypeError):
            raise _NotConstant(f"{node.op_type} input {name!r} has an unsupported type") from None
        inputs.append(onnx.helper.make_tensor_value_info(name, elem, None))
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = onnx.helper.make_graph([node], "computed_constant", inputs, outputs)
    opset = g.opset or onnx.defs.onnx_opset_version()
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        result = ReferenceEvaluator(model).run(None, feeds)
    except Exception as exc:  # the reference evaluator's own error: not a constant we know
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise _NotConstant(f"evaluating {node.op_type} failed: {text}") from None
    return [np.asarray(r) for r in result]


def prune(g: Graph) -> None:
    """Remove the computing nodes of computed constants that nothing reads any more (a
    fold replaced their result with an initializer), then the constants they read."""
    inner = g.computed.inner
    if not inner:
        return
    g.reindex()
    leaves: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in reversed(list(g.g.node)):
            outs = [o for o in node.output if o]
            if not outs or not all(o in inner for o in outs):
                continue
            if any(g.consumers.get(o) or o in g.output_names for o in outs):
                continue
            leaves.update(i for i in node.input if i)
            g.remove_node(node)
            g.drop_value_info(outs)
            changed = True
    if leaves:
        g.remove_unused_initializers(leaves)
    inner.clear()
