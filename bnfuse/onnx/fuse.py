"""The ONNX fold pass: find every normalization, try the rules, record folds and refusals."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from bnfuse.backend import FuseOptions, PassResult
from bnfuse.errors import FusionInvariantError
from bnfuse.onnx.graph import Graph, NameSource, node_label
from bnfuse.onnx.rules import (
    BACKWARD_RULES,
    FORWARD_RULES,
    ForwardTarget,
    Norm,
    bn_norm,
)
from bnfuse.result import Fold, Refusal

__all__ = ["RULE_NAMES", "fuse_graph", "fuse_model"]

RULE_NAMES: tuple[str, ...] = tuple(r.name for r in BACKWARD_RULES) + tuple(
    r.name for r in FORWARD_RULES
)

NormFinder = Callable[[onnx.NodeProto, Graph, int], "Norm | str | None"]


def _bn_finder(node: onnx.NodeProto, g: Graph, opset: int) -> Norm | str | None:
    if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
        return bn_norm(node, g, opset)
    return None


#: Functions that recognise a normalization starting at a node (issue: BN in disguise).
NORM_FINDERS: list[NormFinder] = [_bn_finder]


def _shape_map(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is best-effort; rules refuse when they need a shape
        inferred = model
    shapes: dict[str, tuple[int | str | None, ...]] = {}

    def collect(vis: list[onnx.ValueInfoProto]) -> None:
        for vi in vis:
            t = vi.type.tensor_type
            if not t.HasField("shape"):
                continue
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in t.shape.dim
            )

    g = inferred.graph
    collect(list(g.input) + list(g.output) + list(g.value_info))
    for init in g.initializer:
        shapes.setdefault(init.name, tuple(init.dims))
    return shapes


def fuse_model(model: onnx.ModelProto, options: FuseOptions) -> PassResult:
    """Fold normalizations in a copy of ``model``; the argument is not modified."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    opset = next((o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")), 0)
    names = NameSource(fused)
    result = PassResult(model=fused)
    shapes = _shape_map(fused)
    fuse_graph(fused.graph, names, options, opset, shapes, result, outer=None, scope="")
    return result


def fuse_graph(
    graph: onnx.GraphProto,
    names: NameSource,
    options: FuseOptions,
    opset: int,
    shapes: dict[str, tuple[int | str | None, ...]],
    result: PassResult,
    outer: Graph | None,
    scope: str,
) -> None:
    """Fold inside one graph until nothing changes; refusals are those of the final state."""
    backward = [r for r in BACKWARD_RULES if r.name not in options.skip_rules]
    forward = (
        [r for r in FORWARD_RULES if r.name not in options.skip_rules] if options.forward else []
    )
    g = Graph(graph, names, options.treat_initializer_inputs_as_constants, outer, shapes)
    refused: dict[str, Refusal] = {}
    removed: set[int] = set()
    while True:
        progressed = False
        refused.clear()
        for node in list(graph.node):
            if id(node) in removed:
                continue
            norm: Norm | str | None = None
            for finder in NORM_FINDERS:
                norm = finder(node, g, opset)
                if norm is not None:
                    break
            if norm is None:
                continue
            label = node_label(node)
            kind = node.op_type
            if label in options.exclude:
                refused[label] = Refusal(label, "excluded (rolled back)", kind, "", scope)
                continue
            if isinstance(norm, str):
                refused[label] = Refusal(label, norm, kind, "", scope)
                continue
            fold, reason, rule = _try_fold(norm, g, backward, forward, scope)
            if fold is not None:
                result.folds.append(fold)
                removed.update(id(n) for n in norm.nodes)
                g.remove_unused_initializers(norm.params)
                progressed = True
                continue
            refused[label] = Refusal(label, reason, norm.kind, rule, scope)
        if not progressed:
            break
    result.refusals.extend(refused.values())
    _check_invariants(g, result, scope)


def _try_fold(
    norm: Norm, g: Graph, backward: list, forward: list, scope: str
) -> tuple[Fold | None, str, str]:
    reasons: list[tuple[str, str]] = []
    for rule in backward:
        m = rule.match(norm, g)
        if m is None:
            continue
        reason = rule.check(m, g)
        if reason is None:
            try:
                into = rule.rewrite(m, g)
            except OverflowError as exc:
                return None, f"{exc} (fold refused)", rule.name
            return (
                Fold(norm.name, into, rule.name, "backward", norm.channels, norm.kind, "", scope),
                "",
                rule.name,
            )
        reasons.append((rule.name, reason))
        break  # one producer, one applicable rule
    if forward:
        fwd = _try_forward(norm, g, forward, scope)
        if isinstance(fwd, Fold):
            return fwd, "", fwd.rule
        if fwd is not None:
            reasons.append(fwd)
    if reasons:
        rule, reason = reasons[0]
        return None, reason, rule
    prod = g.producer.get(norm.input)
    before = f"{prod.op_type}" if prod is not None else "a graph input"
    return (
        None,
        f"no linear layer to fold into: produced by {before}, "
        "and not followed only by Conv/Gemm/MatMul",
        "",
    )


def _try_forward(norm: Norm, g: Graph, forward: list, scope: str) -> Fold | tuple[str, str] | None:
    if norm.axis != 1:
        return None
    consumers = g.consumers.get(norm.output, [])
    if not consumers:
        return None
    targets: list[tuple[object, ForwardTarget]] = []
    for c in consumers:
        found: ForwardTarget | str | None = None
        rule_used = None
        for rule in forward:
            found = rule.target(norm, c, g)
            if found is not None:
                rule_used = rule
                break
        if found is None:
            if len(consumers) == 1:
                return None
            return ("", f"output also feeds {c.op_type} {node_label(c)!r}, which cannot absorb it")
        if isinstance(found, str):
            return (rule_used.name if rule_used else "", found)
        targets.append((rule_used, found))
    if norm.output in g.output_names:
        return (targets[0][0].name, f"{norm.kind} output is a graph output")  # type: ignore[attr-defined]
    try:
        for rule, t in targets:
            rule.rewrite(norm, t, g)  # type: ignore[attr-defined]
            g.reindex()
    except OverflowError as exc:
        return (targets[0][0].name, f"{exc} (fold refused)")  # type: ignore[attr-defined]
    for _, t in targets:
        head = t.via if t.via is not None else t.node
        for i, name in enumerate(head.input):
            if name == norm.output:
                head.input[i] = norm.input
    for n in norm.nodes:
        g.remove_node(n)
    g.drop_value_info([norm.output])
    into = ", ".join(node_label(t.node) for _, t in targets)
    rule_name = targets[0][0].name  # type: ignore[attr-defined]
    detail = "scale only (shift is zero)" if all(t.scale_only for _, t in targets) else ""
    return Fold(norm.name, into, rule_name, "forward", norm.channels, norm.kind, detail, scope)


def _check_invariants(g: Graph, result: PassResult, scope: str) -> None:
    g.reindex()
    for node in g.g.node:
        for name in node.input:
            known = name in g.producer or name in g.inits or name in g.input_names
            if name and not known and g.outer is None:
                raise FusionInvariantError(f"tensor {name!r} lost its producer", scope=scope)
    for o in g.output_names:
        if o not in g.producer and o not in g.inits and o not in g.input_names and g.outer is None:
            raise FusionInvariantError(f"graph output {o!r} lost its producer", scope=scope)
