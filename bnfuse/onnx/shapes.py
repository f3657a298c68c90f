"""Shapes of an ONNX model's tensors, from the declared value infos and best-effort shape
inference, for the main graph and every subgraph; inferred lazily, since most folds never
need one (:meth:`bnfuse.onnx.graph.Graph.rank` proves ranks from the producers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from bnfuse.onnx.graph import subgraph_slots
from bnfuse.onnx.storage import has_large_payloads, skeleton

__all__ = ["Shape", "ShapeDict", "ShapeTree", "lazy_shape_tree", "shape_map", "shape_tree"]

Shape = tuple[int | str | None, ...]
ShapeDict = dict[str, Shape]


@dataclass
class ShapeTree:
    """Inferred shapes of one graph, and of the subgraphs of its nodes.

    Children are keyed ``(node index, attribute name, graph index)`` in the graph as it
    was when shapes were inferred (subgraphs are folded before their parent graph, so
    the indices still hold when they are looked up).
    """

    values: Mapping[str, Shape] = field(default_factory=dict)
    children: Mapping[tuple[int, str, int], ShapeTree] = field(default_factory=dict)
    types: Mapping[str, int] = field(default_factory=dict)  # element types, where known


def _collect(graph: onnx.GraphProto) -> ShapeTree:
    values: ShapeDict = {}
    types: dict[str, int] = {}
    children: dict[tuple[int, str, int], ShapeTree] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.elem_type:
            types[vi.name] = int(t.elem_type)
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            continue
        values[vi.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
    for init in graph.initializer:
        values.setdefault(init.name, tuple(int(d) for d in init.dims))
    for i, node in enumerate(graph.node):
        for attr, j, sub in subgraph_slots(node):
            children[(i, attr, j or 0)] = _collect(sub)
    return ShapeTree(values, children, types)


class _Once:
    """Calls ``compute`` the first time it is asked, then returns the same result."""

    def __init__(self, compute: Callable[[], ShapeTree]) -> None:
        self._compute: Callable[[], ShapeTree] | None = compute
        self._tree: ShapeTree | None = None

    @property
    def tree(self) -> ShapeTree:
        if self._compute is not None:
            self._tree, self._compute = self._compute(), None
        assert self._tree is not None
        return self._tree


class _LazyPart(Mapping[Any, Any]):
    """``tree.values`` or ``tree.children`` of a :class:`ShapeTree` made on first use."""

    def __init__(self, once: _Once, part: str) -> None:
        self._once, self._part = once, part

    def _data(self) -> Mapping[Any, Any]:
        data: Mapping[Any, Any] = getattr(self._once.tree, self._part)
        return data

    def __getitem__(self, key: Any) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


def lazy_shape_tree(model: onnx.ModelProto) -> ShapeTree:
    """:func:`shape_tree` of ``model``, run when a shape is first looked up.

    Most folds never need one (:meth:`Graph.rank` proves ranks from the producers, and
    declared input shapes are read directly), and inference is the largest fixed cost of
    a small model's pass. When a rule does need it, inference sees the model as it is
    then: folds already made keep every remaining tensor's shape (a fold renames or
    removes tensors, it never reshapes one), and subgraphs, whose shapes are keyed by
    node index, are folded before their parent graph changes.
    """
    once = _Once(lambda: shape_tree(model))
    return ShapeTree(
        values=_LazyPart(once, "values"),
        children=_LazyPart(once, "children"),
        types=_LazyPart(once, "types"),
    )


def shape_tree(model: onnx.ModelProto) -> ShapeTree:
    """Shapes from ONNX shape inference, main graph and subgraphs (best effort).

    Inference never sees the large weight payloads (dims and small constants are kept),
    so it costs no second copy of the weights and works beyond 2 GB: a model whose large
    tensors are all placeholders (a loaded file, a lazy copy) is light already; any other
    is inferred on a copy without them.
    """
    try:
        light = skeleton(model) if has_large_payloads(model) else model
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is best-effort; rules refuse when they need a shape
        inferred = model
    return _collect(inferred.graph)


def shape_map(model: onnx.ModelProto) -> ShapeDict:
    """Shapes of the main graph's tensors (see :func:`shape_tree`)."""
    return dict(shape_tree(model).values)
