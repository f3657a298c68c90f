"""The ONNX fold pass: find every normalization, try the rules, record folds and refusals."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx

from bnfuse.backend import FuseOptions, PassResult
from bnfuse.driver import fold_norm, sweep
from bnfuse.errors import FusionInvariantError, first_line
from bnfuse.keep import kept_by, kept_reason
from bnfuse.onnx.affine import affine_norm
from bnfuse.onnx.constants import prune as prune_computed
from bnfuse.onnx.graph import (
    Graph,
    MalformedNodeError,
    NameSource,
    node_label,
    outer_names_used,
    subgraph_slots,
)
from bnfuse.onnx.norm import Norm, bn_norm
from bnfuse.onnx.rulebase import ForwardMatch, Write
from bnfuse.onnx.rules import BACKWARD, FORWARD, RULES, BackwardRule, ForwardRule
from bnfuse.onnx.shapes import ShapeDict, ShapeTree, lazy_shape_tree, shape_map
from bnfuse.onnx.storage import Payloads, iter_tensors, lazy_copy, materialize
from bnfuse.plan import fold_record
from bnfuse.reasons import EXCLUDED, Reason, overflow, refusal, tagged
from bnfuse.result import Fold, Refusal

__all__ = ["NORM_FINDERS", "RULE_NAMES", "ShapeTree", "fuse_graph", "fuse_model", "shape_map"]

#: Skipping this name (``--skip const-affine``) stops Mul/Add/Sub/Div chains from being
#: recognised as normalizations; BatchNormalization nodes still fold.
AFFINE_FINDER = "const-affine"

RULE_NAMES: tuple[str, ...] = (*(r.name for r in RULES), AFFINE_FINDER)

NormFinder = Callable[[onnx.NodeProto, Graph, int], "Norm | Reason | None"]


def _bn_finder(node: onnx.NodeProto, g: Graph, opset: int) -> Norm | Reason | None:
    if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
        return bn_norm(node, g, opset)
    return None


#: Functions that recognise a normalization starting at a node: a BatchNormalization, or
#: a BN in disguise (a chain of Mul/Add/Sub/Div by per-channel constants).
NORM_FINDERS: list[NormFinder] = [_bn_finder, affine_norm]


def fuse_model(
    model: onnx.ModelProto,
    options: FuseOptions,
    payloads: Payloads | None = None,
    *,
    keep_placeholders: bool = False,
) -> tuple[PassResult, Payloads]:
    """Fold normalizations in a copy of ``model``; the argument is not modified (unless
    ``options.in_place``).

    Folds inside the main graph, every subgraph (If branches, Loop/Scan bodies, nested)
    and every model-local function body. ``payloads`` holds the data of ``model``'s
    placeholder tensors, if it has any. Returns the result and the store of the fused
    model's placeholders: with ``keep_placeholders`` its large main-graph weights stay
    there (:mod:`bnfuse.onnx.storage` writes them from it), else every placeholder is
    filled and the model is complete.
    """
    if options.in_place:  # the caller will not use ``model`` again
        fused = model
        store = payloads if payloads is not None else Payloads()
    else:
        fused, store = lazy_copy(model, payloads)  # weights are read from ``model`` until written
    opset = _opset(fused.opset_import, 0)
    names = NameSource(fused)
    result = PassResult(model=fused)
    shapes = lazy_shape_tree(fused)
    fuse_graph(
        fused.graph, names, options, opset, shapes, result, outer=None, scope="", payloads=store
    )
    for f in fused.functions:
        _fuse_function(f, names, options, _opset(f.opset_import, opset), result, store)
    if not keep_placeholders:
        materialize(fused, store)
    else:  # only main-graph initializers may stay placeholders (what the writer streams)
        store.materialize(iter_tensors(fused, main_initializers=False))
    return result, store


def _opset(imports: Iterable[onnx.OperatorSetIdProto], default: int) -> int:
    return next((o.version for o in imports if o.domain in ("", "ai.onnx")), default)


def _fuse_function(
    f: onnx.FunctionProto,
    names: NameSource,
    options: FuseOptions,
    opset: int,
    result: PassResult,
    payloads: Payloads,
) -> None:
    """Fold inside a function body: its weights are Constant nodes (inputs are not constants)."""
    body = onnx.GraphProto(name=f.name)
    body.node.extend(f.node)
    body.input.extend(onnx.helper.make_empty_tensor_value_info(i) for i in f.input)
    body.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in f.output)
    scope = f"function {f.domain}.{f.name}" if f.domain else f"function {f.name}"
    before = len(result.folds)
    fuse_graph(
        body,
        names,
        options,
        opset,
        ShapeTree(),
        result,
        None,
        scope,
        function=True,
        payloads=payloads,
    )
    if len(result.folds) != before:
        if body.initializer:
            raise FusionInvariantError("a function body gained an initializer", scope=scope)
        del f.node[:]
        f.node.extend(body.node)


def _sub_scope(parent: str, node: onnx.NodeProto, attr_name: str, index: int | None) -> str:
    which = attr_name if index is None else f"{attr_name}[{index}]"
    here = f"{node.op_type}:{which} of node {node_label(node)}"
    return f"{parent} / {here}" if parent else here


def _fuse_subgraphs(
    g: Graph,
    names: NameSource,
    options: FuseOptions,
    opset: int,
    tree: ShapeTree,
    result: PassResult,
    scope: str,
) -> None:
    for i, node in enumerate(list(g.g.node)):
        for attr, j, sub in list(subgraph_slots(node)):
            used_outside = outer_names_used(sub)
            child = tree.children.get((i, attr, j or 0), ShapeTree())
            sub_scope = _sub_scope(scope, node, attr, j)
            fuse_graph(sub, names, options, opset, child, result, g, sub_scope, payloads=g.payloads)
            # outer weights the subgraph no longer reads (it folded into copies)
            h: Graph | None = g
            while h is not None:
                h.remove_unused_initializers(used_outside)
                h = h.outer


def fuse_graph(
    graph: onnx.GraphProto,
    names: NameSource,
    options: FuseOptions,
    opset: int,
    shapes: ShapeTree | ShapeDict,
    result: PassResult,
    outer: Graph | None,
    scope: str,
    *,
    function: bool = False,
    payloads: Payloads | None = None,
) -> None:
    """Fold inside one graph until nothing changes; refusals are those of the final state.

    Subgraphs of its nodes are folded first (recursively, ``outer`` = this graph, whose
    constants count as constants there).
    """
    tree = shapes if isinstance(shapes, ShapeTree) else ShapeTree(values=dict(shapes))
    backward = [r for r in BACKWARD if r.name not in options.skip_rules]
    forward = [r for r in FORWARD if r.name not in options.skip_rules] if options.forward else []
    g = Graph(
        graph,
        names,
        options.treat_initializer_inputs_as_constants,
        outer,
        tree.values,
        function=function,
        payloads=payloads,
        types=tree.types,
        opset=opset,
    )
    undefined = _undefined_names(g)  # a damaged input's dangling reads are not ours to lose
    _fuse_subgraphs(g, names, options, opset, tree, result, scope)
    finders = [
        f for f in NORM_FINDERS if not (f is affine_norm and AFFINE_FINDER in options.skip_rules)
    ]
    refused: dict[str, Refusal] = {}
    dead: set[str] = set()  # parameters of folded normalizations, dropped once at the end

    def one_pass() -> bool:  # every norm once, in graph order: bnfuse/driver.py
        progressed = False
        refused.clear()
        # ids of nodes removed during this pass; valid only while ``pass_nodes`` holds
        # the wrappers (protobuf wrappers die with their last reference, ids get reused)
        removed: set[int] = set()
        pass_nodes = list(graph.node)
        for node in pass_nodes:
            if id(node) in removed:
                continue
            norm: Norm | Reason | None = None
            for finder in finders:
                try:
                    norm = finder(node, g, opset)
                except READ_ERRORS as exc:
                    norm = _unreadable(exc)
                if norm is not None:
                    break
            if norm is None:
                continue
            label = node_label(node)
            kind = node.op_type
            held = _held(label, getattr(norm, "kind", kind), options, scope)
            if held is not None:
                refused[label] = held
                continue
            if isinstance(norm, str):
                refused[label] = refusal(label, norm, kind=kind, scope=scope)
                continue
            fold = _try_fold(norm, g, backward, forward, scope)
            if isinstance(fold, tuple):
                reason, rule = fold
                refused[label] = refusal(label, reason, kind=norm.kind, rule=rule, scope=scope)
                continue
            result.folds.append(fold)
            removed.update(id(n) for n in norm.nodes)
            dead.update(norm.params)
            if CHECK_INDEX:
                mismatch = g.index_matches()
                if mismatch:
                    raise FusionInvariantError(mismatch, fold=fold.bn, scope=scope)
            progressed = True
        return progressed

    sweep(one_pass)
    result.refusals.extend(refused.values())
    if dead:
        g.remove_unused_initializers(dead, reindex=False)  # the edits kept the index exact
    prune_computed(g)  # computing nodes of constants that folds replaced
    _check_invariants(g, result, scope, undefined)


#: Tests set this to compare the incrementally kept graph index with a fresh one after
#: every fold (a wrong index could make a later fold miss a consumer).
CHECK_INDEX = False

#: Errors of *reading* a malformed graph while matching (nothing was changed yet): they
#: become a refusal of that normalization. Errors while rewriting are not caught.
READ_ERRORS = (MalformedNodeError, ValueError, TypeError, IndexError, KeyError)


def _unreadable(exc: Exception) -> Reason:
    text = first_line(exc, 200)
    if isinstance(exc, MalformedNodeError):
        return tagged("unsupported-layer", f"malformed node: {text}")
    return tagged(
        "unsupported-layer",
        f"cannot read the graph around this node ({type(exc).__name__}: {text})",
    )


def _held(label: str, kind: str, options: FuseOptions, scope: str) -> Refusal | None:
    """The refusal of a normalization the caller keeps (``exclude`` or ``keep``), or None."""
    if label in options.exclude:
        return refusal(label, EXCLUDED, kind=kind, scope=scope)
    scoped = f"{scope}/{label}" if scope else ""
    pattern = kept_by((label, scoped), options.keep) if options.keep else None
    if pattern is not None:
        return refusal(label, kept_reason(pattern), kind=kind, scope=scope)
    return None


def _try_fold(
    norm: Norm, g: Graph, backward: list[BackwardRule], forward: list[ForwardRule], scope: str
) -> Fold | tuple[Reason, str]:
    """Fold ``norm``: backward into its producer first, else forward into its consumers
    (the one order of every backend, :func:`bnfuse.driver.fold_norm`). Returns the fold,
    or the reason and rule of the first refusal."""
    prod = g.producer.get(norm.input)
    attempts = fold_norm(
        lambda: _try_backward(norm, g, backward, scope),
        (lambda: _try_forward(norm, g, forward, scope)) if forward else None,
        lambda got: isinstance(got, Fold),
    )
    last = attempts[-1]
    if isinstance(last, Fold):
        return last
    reasons = [a for a in attempts if isinstance(a, tuple)]
    if reasons:
        rule_name, reason = reasons[0]
        return reason, rule_name
    before = f"{prod.op_type}" if prod is not None else "a graph input"
    return (
        tagged(
            "no-partner",
            f"no linear layer to fold into: produced by {before}, "
            "and not followed only by Conv/Gemm/MatMul",
        ),
        "",
    )


def _try_backward(
    norm: Norm, g: Graph, backward: list[BackwardRule], scope: str
) -> Fold | tuple[str, Reason] | None:
    """Fold ``norm`` into its producer: the fold, or (rule, reason) of the one rule that
    matched, or None when none matched (or a graph input produces it)."""
    prod = g.producer.get(norm.input)
    if prod is None:
        return None  # a graph input: no producer to fold into
    for rule in backward:
        try:
            m = rule.match(norm, prod, g)
            if m is None:
                continue
            reason = rule.check(m, g)
        except READ_ERRORS as exc:
            return (rule.name, _unreadable(exc))
        if reason is not None:
            return (rule.name, reason)  # one producer, one applicable rule
        try:
            into = rule.rewrite(m, g)
        except OverflowError as exc:
            return (rule.name, overflow(node_label(m.producer), exc))
        return fold_record(
            norm.name,
            "backward",
            [into],
            [rule.name],
            channels=norm.channels,
            kind=norm.kind,
            scope=scope,
        )
    return None


def _forward_match(
    norm: Norm, c: onnx.NodeProto, g: Graph, forward: list[ForwardRule]
) -> tuple[ForwardRule | None, ForwardMatch | Reason | None]:
    """The first forward rule that matches consumer ``c``, and its match or refusal."""
    for rule in forward:
        try:
            m = rule.match(norm, c, g)
            if m is None:
                continue
            return rule, rule.check(m, g) or m
        except READ_ERRORS as exc:
            return rule, _unreadable(exc)
    return None, None


def _try_forward(
    norm: Norm, g: Graph, forward: list[ForwardRule], scope: str
) -> Fold | tuple[str, Reason] | None:
    """Fold ``norm`` into every consumer of its output, or into none: every consumer
    must match a rule and pass its check; all are prepared (every value computed and
    rounded) before any is written, so an overflow in one leaves the graph unchanged."""
    consumers = g.consumers.get(norm.output, [])
    if not consumers:
        return None
    targets: list[tuple[ForwardRule, ForwardMatch]] = []
    for c in consumers:
        rule, found = _forward_match(norm, c, g, forward)
        if rule is None or found is None:
            if len(consumers) == 1:
                return None
            return (
                "",
                tagged(
                    "shared-output",
                    f"output also feeds {c.op_type} {node_label(c)!r}, which cannot absorb it",
                ),
            )
        if isinstance(found, str):
            return (rule.name, found)
        targets.append((rule, found))
    if norm.output in g.output_names:
        return (
            targets[0][0].name,
            tagged("shared-output", f"{norm.kind} output is a graph output"),
        )
    current = targets[0][1]  # the target being prepared, named by an overflow
    writes: list[Write] = []
    try:
        for rule, current in targets:
            writes.append(rule.prepare(current, g))
    except OverflowError as exc:
        return (targets[0][0].name, overflow(node_label(current.node), exc))
    into = [write() for write in writes]
    for _, m in targets:
        head = m.head
        for i, name in enumerate(head.input):
            if name == norm.output:
                g.set_input(head, i, norm.input)
    for n in norm.nodes:
        g.remove_node(n)
    g.drop_value_info([norm.output])
    detail = "scale only (shift is zero)" if all(m.scale_only for _, m in targets) else ""
    return fold_record(
        norm.name,
        "forward",
        into,
        [r.name for r, _ in targets],
        channels=norm.channels,
        kind=norm.kind,
        details=[detail],
        scope=scope,
    )


def _undefined_names(g: Graph) -> set[str]:
    """Tensors the main graph reads (or outputs) that nothing defines: a damaged model's,
    there before the pass, so :func:`_check_invariants` does not take them for ours."""
    if g.outer is not None:
        return set()
    read = {name for node in g.g.node for name in node.input if name} | set(g.output_names)
    return {n for n in read if n not in g.producer and n not in g.inits and n not in g.input_names}


def _check_invariants(g: Graph, result: PassResult, scope: str, undefined: set[str]) -> None:
    g.reindex()
    for node in g.g.node:
        for name in node.input:
            known = name in g.producer or name in g.inits or name in g.input_names
            if name and not known and g.outer is None and name not in undefined:
                raise FusionInvariantError(f"tensor {name!r} lost its producer", scope=scope)
    for o in g.output_names:
        known = o in g.producer or o in g.inits or o in g.input_names
        if not known and g.outer is None and o not in undefined:
            raise FusionInvariantError(f"graph output {o!r} lost its producer", scope=scope)
