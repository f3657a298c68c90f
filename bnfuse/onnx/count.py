"""Counting normalizations: BatchNormalization nodes and the BN-equivalent affines the
finder of :mod:`bnfuse.onnx.affine` would take, over the main graph, subgraphs and
function bodies (benchmarks and tests compare the counts before and after a pass)."""

from __future__ import annotations

import onnx

from bnfuse.onnx.affine import (
    AFFINE_OPS,
    Step,
    _default,
    _is_matmul_bias,
    _listed,
    _non_const_input,
    step_of,
)
from bnfuse.onnx.graph import Graph, NameSource, subgraph_slots
from bnfuse.onnx.shapes import ShapeTree, shape_tree

__all__ = ["count_affine_nodes"]


def count_affine_nodes(model: onnx.ModelProto, shapes: bool = True) -> dict[str, int]:
    """BN-equivalent nodes of a model: BatchNormalization nodes, and Mul/Add/Sub/Div by a
    per-channel (or scalar) constant next to a linear layer (a MatMul's bias Add excluded).

    Counted over the main graph, subgraphs (whose outer-scope constants count) and
    function bodies; returns ``{"BatchNormalization": n, "affine": m}``.
    """
    names = NameSource(model)
    counts = {"BatchNormalization": 0, "affine": 0}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def walk(graph: onnx.GraphProto, tree: ShapeTree, outer: Graph | None, fn: bool) -> None:
        g = Graph(
            graph, names, True, outer, tree.values, function=fn, types=tree.types, opset=opset
        )
        for i, n in enumerate(graph.node):
            if n.op_type == "BatchNormalization" and _default(n):
                counts["BatchNormalization"] += 1
            elif n.op_type in AFFINE_OPS and not _is_matmul_bias(n, g):
                try:
                    st = step_of(n, g)
                except ValueError:  # unreadable constant: not counted
                    st = None
                x = _non_const_input(n, g)
                if isinstance(st, Step) and x is not None and _listed(st, x, g):
                    counts["affine"] += 1
            for attr, j, sub in subgraph_slots(n):
                walk(sub, tree.children.get((i, attr, j or 0), ShapeTree()), g, False)

    walk(model.graph, shape_tree(model) if shapes else ShapeTree(), None, False)
    for f in model.functions:
        body = onnx.GraphProto(name=f.name, node=f.node)
        body.input.extend(onnx.helper.make_empty_tensor_value_info(i) for i in f.input)
        body.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in f.output)
        walk(body, ShapeTree(), None, True)
    return counts
