"""The Keras fold pass: plan on the config, fold in float64, rebuild, copy weights.

1. ``model.get_config()`` (a deep copy; the input model is never touched) is wrapped in
   :class:`~bnfuse.keras.graph.Scope` objects, one per Functional/Sequential graph (nested
   models included).
2. Every BatchNormalization, in layer order, is tried backward (into the layer before
   it), then forward (into the layers after it), swept until nothing changes so chains
   such as ``Conv -> BN -> BN`` fold completely: the one order of every backend,
   :mod:`bnfuse.driver`. Each fold updates a float64 working copy of the absorbing
   layer's weights and edits the config (BN layer removed, consumers rewired,
   ``use_bias`` turned on).
3. The model is rebuilt with ``from_config`` and every variable is copied: folded layers
   from the working copy (rounded once to the variable dtype), all others exactly, with
   Keras's own ``save_own_variables``/``load_own_variables``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnfuse.backend import FuseOptions, PassResult
from bnfuse.driver import fold_norm, sweep
from bnfuse.errors import FusionInvariantError, UnsupportedModelError
from bnfuse.fold import Affine, round_to
from bnfuse.keep import kept_by, kept_reason
from bnfuse.keras import rules as R
from bnfuse.keras.affines import affine_kind, flat_affine, layer_affine
from bnfuse.keras.compat import Flavor, flavor_of
from bnfuse.keras.graph import INPUT, Node, Scope
from bnfuse.plan import ForwardPlan
from bnfuse.reasons import EXCLUDED, Reason, overflow, refusal, tagged
from bnfuse.result import Fold, Refusal

__all__ = ["check_rewritable", "fuse", "is_graph_model"]

F64 = NDArray[np.float64]
#: A forward fold planned into one layer: (node, rule, the core's plan, detail).
_Plan = tuple[Node, R.Rule, ForwardPlan, str]


def is_graph_model(obj: Any) -> bool:
    """True for a plain Functional or Sequential model (a graph bnfuse can edit)."""
    return flavor_of(obj).is_graph_model(obj)


def check_rewritable(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a built graph model."""
    fl = flavor_of(model)
    if not isinstance(model, fl.model_cls):
        raise UnsupportedModelError(f"expected a keras.Model, got {type(model).__name__}")
    if not is_graph_model(model):
        raise UnsupportedModelError(
            f"model '{model.name}' is a subclassed Keras model ({type(model).__name__}): "
            "it has no layer graph bnfuse can rewrite; rebuild it with the Functional or "
            "Sequential API"
        )
    if not model.built or not model.inputs:
        raise UnsupportedModelError(
            f"model '{model.name}' is not built: give it an Input or call it once"
        )


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _is_bn(layer: Any) -> bool:
    return flavor_of(layer).is_bn(layer)


@dataclass
class _BN:
    scope: Scope
    name: str
    layer: Any
    aff: Affine | None = None
    axis: int | None = None  # the one axis the affine varies over (batch dim counted)
    raw_axis: Any = None
    rank: int | None = None
    reason: Reason | None = None  # refused whatever the neighbours
    kind: str = "BatchNormalization"  # or Normalization / Rescaling (forward only)
    axes: tuple[int, ...] = ()  # every axis the affine varies over (several: Keras 2 BN)
    dims: tuple[int, ...] = ()  # the input's sizes along ``axes``

    @property
    def key(self) -> tuple[str, str]:
        return (self.scope.path, self.name)

    def ready(self) -> tuple[Affine, int, int]:
        """(affine, axis, rank) of a BN without a BN-level refusal; axis -1 when the
        affine varies over several axes or none (see ``axes``)."""
        if self.aff is None or self.rank is None:
            raise FusionInvariantError(f"BN '{self.name}' was tried although it was refused")
        return self.aff, (self.axis if self.axis is not None else -1), self.rank

    def axes_text(self) -> str:
        """The axes, for messages: ``axes [1, 2]`` or ``no axis (a scalar)``."""
        if not self.axes:
            return "no axis (one scalar for every element)"
        return f"axes {list(self.axes)}"


@dataclass
class _Attempt:
    """The outcome of trying one direction for one BN."""

    candidate: bool  # a layer of a foldable kind sits on that side
    rule: str = ""
    reason: Reason | None = None
    fold: Fold | None = None
    #: its code names a refusal that also gives the other side's reason (a geometry or
    #: plan refusal backward), rather than the weightier code of the two
    decisive: bool = False


@dataclass
class _Store:
    """Float64 working copies of the weights of every layer a fold touched."""

    weights: dict[tuple[str, str], dict[str, F64]] = field(default_factory=dict)
    dtypes: dict[tuple[str, str], dict[str, np.dtype[Any]]] = field(default_factory=dict)
    modified: set[tuple[str, str]] = field(default_factory=set)

    def get(self, scope: Scope, name: str, layer: Any) -> dict[str, F64]:
        key = (scope.path, name)
        if key not in self.weights:
            fl = flavor_of(layer)
            self.weights[key] = {
                fl.var_name(v, layer): np.asarray(fl.to_numpy(v), dtype=np.float64)
                for v in layer.weights
            }
            self.dtypes[key] = {fl.var_name(v, layer): fl.dtype(v) for v in layer.weights}
        return dict(self.weights[key])

    def check(self, scope: Scope, name: str, new: dict[str, F64]) -> Reason | None:
        """None when ``new`` rounds to the variable dtypes without overflow."""
        dtypes = self.dtypes[(scope.path, name)]
        kdt = dtypes.get("kernel", dtypes.get("pointwise_kernel", np.dtype(np.float32)))
        for var, value in new.items():
            dt = dtypes.get(var, kdt)
            try:
                round_to(value, dt)
            except OverflowError as exc:
                return overflow(name, exc)
        return None

    def put(self, scope: Scope, name: str, new: dict[str, F64]) -> None:
        key = (scope.path, name)
        dtypes = self.dtypes[key]
        kdt = dtypes.get("kernel", dtypes.get("pointwise_kernel", np.dtype(np.float32)))
        for var in new:
            dtypes.setdefault(var, kdt)
        self.weights[key] = new
        self.modified.add(key)

    def rounded(self, path: str, name: str) -> dict[str, NDArray[Any]] | None:
        key = (path, name)
        if key not in self.modified:
            return None
        return {k: round_to(v, self.dtypes[key][k]) for k, v in self.weights[key].items()}


class _Pass:
    def __init__(self, model: Any, options: FuseOptions) -> None:
        self.model = model
        self.options = options
        self.fl: Flavor = flavor_of(model)
        self.config = copy.deepcopy(model.get_config())
        kind = "sequential" if self.fl.is_sequential(model) else "functional"
        self.root = Scope("", self.config, model, kind)
        self.scopes: list[Scope] = []
        self.opaque: list[Refusal] = []
        self._collect(self.root)
        self.store = _Store()
        self.bns: list[_BN] = []
        for s in self.scopes:
            for name in s.names():
                layer = s.live_layer(name)
                akind = affine_kind(self.fl, layer) if layer is not None else None
                if akind is not None:
                    self.bns.append(self._bn(s, name, layer, akind))

    # -- discovery -------------------------------------------------------------------

    def _collect(self, scope: Scope) -> None:
        self.scopes.append(scope)
        for e in list(scope.entries):
            name = scope.entry_name(e)
            layer = scope.live_layer(name)
            if layer is None:
                continue
            offset = self.fl.node_offset(layer)
            if offset:
                scope.set_node_offset(name, offset)
            if is_graph_model(layer):
                kind = "sequential" if self.fl.is_sequential(layer) else "functional"
                self._collect(Scope(_join(scope.path, name), e["config"], layer, kind))
                continue
            inner = [s for s in self.fl.flatten_layers(layer, False) if _is_bn(s)]
            for sub in inner:
                self.opaque.append(
                    refusal(
                        sub.name,
                        tagged(
                            "unsupported-layer",
                            f"inside layer '{name}' ({type(layer).__name__}), whose "
                            "internals bnfuse cannot rewrite",
                        ),
                        scope=_join(scope.path, name),
                    )
                )

    def _bn(self, scope: Scope, name: str, layer: Any, kind: str) -> _BN:
        raw: Any = None
        if kind == "BatchNormalization":
            raw = self.fl.bn_axis(layer)
            if raw is not getattr(layer, "axis", None):  # (a Keras 2 virtual-batch BN)
                scope.set_layer_config(name, axis=list(raw))
        if isinstance(raw, list | tuple) and len(raw) == 1:
            raw = raw[0]
        bn = _BN(scope, name, layer, raw_axis=raw, kind=kind)
        nodes = scope.nodes(name)
        if kind == "BatchNormalization" and not self.fl.is_plain_bn(layer):
            bn.reason = tagged(
                "unsupported-layer",
                f"subclass of BatchNormalization ({type(layer).__name__}): its call may differ",
            )
            return bn
        for n in nodes:
            training = n.kwargs.get("training")
            if kind == "BatchNormalization" and training is not None and training is not False:
                bn.reason = tagged(
                    "training-mode",
                    "BN is called with training=True (batch statistics, not a constant affine)",
                )
                return bn
        got = layer_affine(self.fl, layer, kind, nodes[0].input_shape if nodes else None)
        bn.rank, bn.axes, bn.dims = got.rank, got.axes, got.dims
        if got.reason is not None or got.aff is None:
            bn.reason = got.reason or tagged("unsupported-layer", f"{kind} is not an affine")
            return bn
        bn.aff = got.aff
        bn.axis = got.axes[0] if len(got.axes) == 1 else None
        return bn

    # -- the loop --------------------------------------------------------------------

    def run(self) -> PassResult:
        done: dict[tuple[str, str], Fold] = {}
        refused: dict[tuple[str, str], Reason] = {}
        for bn in self.bns:
            if (
                bn.name in self.options.exclude
                or _join(bn.scope.path, bn.name) in self.options.exclude
            ):
                refused[bn.key] = EXCLUDED
            elif self.options.keep and (
                pattern := kept_by((bn.name, _join(bn.scope.path, bn.name)), self.options.keep)
            ):
                refused[bn.key] = kept_reason(pattern)
            elif bn.reason is not None:
                refused[bn.key] = bn.reason

        def one_pass() -> bool:  # the one order of every backend: bnfuse/driver.py
            changed = False
            for bn in self.bns:
                if bn.key in done or bn.key in refused:
                    continue
                fold = self._try(bn, forward=self.options.forward, apply=True)
                if fold is not None:
                    done[bn.key] = fold
                    changed = True
            return changed

        sweep(one_pass)
        folds = [done[b.key] for b in self.bns if b.key in done]
        refusals: list[Refusal] = []
        for bn in self.bns:
            if bn.key in done:
                continue
            if bn.kind != "BatchNormalization" and not self._next_is_linear(bn):
                continue  # a Rescaling/Normalization with nothing to fold into: not news
            if bn.key in refused:
                refusals.append(
                    refusal(bn.name, refused[bn.key], kind=bn.kind, scope=bn.scope.path)
                )
            else:
                refusals.append(self._refusal(bn))
        refusals.extend(self.opaque)
        new_model = self._rebuild()
        self._postcondition(new_model, folds)
        return PassResult(model=new_model, folds=folds, refusals=refusals)

    def _try(self, bn: _BN, *, forward: bool, apply: bool) -> Fold | None:
        attempts = fold_norm(
            lambda: self._backward(bn, apply),
            (lambda: self._forward(bn, apply)) if forward else None,
            lambda att: att.fold is not None,
        )
        return attempts[-1].fold

    def _refusal(self, bn: _BN) -> Refusal:
        back = self._backward(bn, apply=False)
        fwd = self._forward(bn, apply=False)
        if not self.options.forward and fwd.candidate:
            fwd = _Attempt(
                True, rule=fwd.rule, reason=tagged("rule-skipped", "forward folding is disabled")
            )
        if back.reason is None or fwd.reason is None:
            raise FusionInvariantError(f"BN '{bn.name}' was refused without a reason")
        if back.candidate and fwd.candidate:
            text = f"{back.reason}; forward: {fwd.reason}"
            reason = (
                back.reason.reworded(text)
                if back.decisive
                else Reason.joined(text, back.reason, fwd.reason)
            )
            rule = back.rule
        elif back.candidate:
            reason, rule = back.reason, back.rule
        elif fwd.candidate:
            reason, rule = fwd.reason, fwd.rule
        else:
            what = "BN" if bn.kind == "BatchNormalization" else bn.kind
            text = f"no linear layer next to {what} ({back.reason}; {fwd.reason})"
            reason, rule = tagged("no-partner", text), ""
        return refusal(bn.name, reason, kind=bn.kind, rule=rule, scope=bn.scope.path)

    # -- backward --------------------------------------------------------------------

    def _backward(self, bn: _BN, apply: bool) -> _Attempt:
        s = bn.scope
        if bn.kind != "BatchNormalization":
            return _Attempt(False, reason=_none_before(f"a {bn.kind} layer folds forward only"))
        nodes = s.nodes(bn.name)
        if not nodes or any(n.primary is None for n in nodes):
            return _Attempt(False, reason=_ONE_INPUT)
        srcs = [n.primary for n in nodes if n.primary is not None]
        if len(srcs) != len(nodes):
            return _Attempt(False, reason=_ONE_INPUT)
        src = srcs[0]
        if src[0] == INPUT or s.class_name(src[0]) == "InputLayer":
            where = f"nested model '{s.path}'" if s.path else "the model"
            return _Attempt(False, reason=_none_before(f"the input of {where}"))
        prod = s.live_layer(src[0])
        rule = R.backward_rule_for(prod) if prod is not None else None
        if rule is None:
            cls = type(prod).__name__ if prod is not None else s.class_name(src[0])
            return _Attempt(False, reason=_none_before(f"{cls} '{src[0]}' is not a linear layer"))
        att = _Attempt(True, rule=rule.name)
        pname = src[0]
        if rule.name in self.options.skip_rules:
            att.reason = tagged("rule-skipped", f"rule {rule.name} is disabled")
            return att
        att.reason = _shared_reason(s, len(nodes), srcs, pname) or rule.check(prod)
        if att.reason:
            return att
        aff, axis, rank = bn.ready()
        ch = rule.kind.channel_axis(prod, rank)
        if bn.axis is None:
            att.reason = tagged(
                "axis-mismatch",
                f"BN normalizes over {bn.axes_text()}; a backward fold needs exactly the "
                f"channel axis of '{pname}' (axis {ch} of rank {rank})",
            )
            att.decisive = True
            return att
        if axis != ch:
            att.reason = tagged(
                "axis-mismatch",
                f"BN axis {bn.raw_axis} is not the channel axis of '{pname}' (axis {ch} of "
                f"rank {rank})",
            )
            att.decisive = True
            return att
        w = self.store.get(s, pname, prod)
        plan = rule.plan(prod, w, aff, norm=bn.kind)
        if isinstance(plan, str):
            att.reason, att.decisive = plan, True
            return att
        new = rule.rewrite(w, plan)
        bad = self.store.check(s, pname, new)
        if bad:
            att.reason = bad
            return att
        if not apply:
            return att
        self.store.put(s, pname, new)
        detail = ""
        if not getattr(prod, "use_bias", True) or "bias" not in w:
            s.set_layer_config(pname, use_bias=True)
            detail = "bias added"
        outs = [(bn.name, n.index, 0) for n in nodes]
        if any(s.is_output(o) for o in outs):
            s.replace_with_identity(bn.name, s.entry(bn.name)["config"].get("dtype"))
            detail = ", ".join(x for x in (detail, "model output kept by an Identity") if x)
        else:
            s.remove(bn.name, {n.index: n.primary for n in nodes if n.primary is not None})
        att.fold = Fold(
            bn=bn.name,
            into=pname,
            rule=rule.name,
            direction="backward",
            channels=aff.channels,
            detail=detail,
            scope=s.path,
        )
        return att

    # -- forward ---------------------------------------------------------------------

    def _forward(self, bn: _BN, apply: bool) -> _Attempt:
        s = bn.scope
        nodes = s.nodes(bn.name)
        src = nodes[0].primary if len(nodes) == 1 else None
        if src is None:
            return _Attempt(False, reason=_none_after("BN layer is shared by several call sites"))
        out = (bn.name, nodes[0].index, 0)
        users = s.consumers(out)
        if not users:
            return _Attempt(False, reason=_none_after("no layer, the BN output is a model output"))
        plans: list[_Plan] = []
        reasons: list[tuple[str, Reason]] = []  # (the rule that matched, or "", reason)
        matched: list[str] = []  # the rule of every user that leads to linear layers
        for u in users:
            got = self._forward_targets(bn, u)
            if isinstance(got, str):
                reasons.append(("", got))
                continue
            rule, items = got
            matched.append(rule.name)
            for item in items:
                if isinstance(item, str):
                    reasons.append((rule.name, item))
                else:
                    plans.append(item)
        if not matched:
            shown = "; ".join(r for _, r in reasons[:3])
            if len(reasons) > 3:
                shown += f"; and {len(reasons) - 3} more"
            return _Attempt(False, reason=_none_after(shown))
        att = _Attempt(True, rule=matched[0])
        if s.is_output(out):
            att.reason = tagged("shared-output", "BN output is also a model output")
            return att
        if reasons:
            rule_name, reason = reasons[0]
            att.rule = rule_name or att.rule
            what = "BN" if bn.kind == "BatchNormalization" else bn.kind
            att.reason = (
                reason
                if len(plans) + len(reasons) == 1
                else reason.reworded(f"not every layer after {what} can take it: {reason}")
            )
            return att
        aff = bn.ready()[0]
        news: list[tuple[str, dict[str, F64], Any]] = []
        for node, rule, plan, _ in plans:
            layer = s.live_layer(node.layer)
            new = rule.rewrite(self.store.get(s, node.layer, layer), plan)
            bad = self.store.check(s, node.layer, new)
            if bad:
                att.reason = bad
                return att
            news.append((node.layer, new, layer))
        if not apply:
            return att
        details = []
        for (lname, new, layer), (_, _, _, det) in zip(news, plans, strict=True):
            self.store.put(s, lname, new)
            if not getattr(layer, "use_bias", True):
                s.set_layer_config(lname, use_bias=True)
                det = ", ".join(x for x in (det, f"bias added to '{lname}'") if x)
            if det:
                details.append(det)
        s.remove(bn.name, {nodes[0].index: src})
        rule_names = list(dict.fromkeys(p[1].name for p in plans))
        att.fold = Fold(
            bn=bn.name,
            into=", ".join(dict.fromkeys(n for n, _, _ in news)),
            rule="+".join(rule_names),
            direction="forward",
            channels=aff.channels,
            kind=bn.kind,
            detail="; ".join(dict.fromkeys(details)),
            scope=s.path,
        )
        return att

    def _next_is_linear(self, bn: _BN) -> bool:
        """Does a linear layer (or a Flatten into one) take this layer's output?"""
        s = bn.scope
        for n in s.nodes(bn.name):
            for u in s.consumers(n.output(0)):
                layer = s.live_layer(u.layer)
                if layer is None:
                    continue
                if R.forward_rule_for(layer) is not None:
                    return True
                if self._flatten_like(layer) is not None and any(
                    (f := s.live_layer(c.layer)) is not None and R.KINDS["dense"].matches(f)
                    for c in s.consumers(u.output(0))
                ):
                    return True
        return False

    def _forward_targets(self, bn: _BN, user: Node) -> Reason | tuple[R.Rule, list[_Plan | Reason]]:
        """The rule that matched and, per layer ``user`` leads to, a plan or why that layer
        cannot take the BN; or why ``user`` leads to no linear layer (a plain str)."""
        s = bn.scope
        layer = s.live_layer(user.layer)
        cls = type(layer).__name__ if layer is not None else s.class_name(user.layer)
        out = (bn.name, s.nodes(bn.name)[0].index, 0)
        if layer is None:
            return _not_linear(f"{cls} '{user.layer}'")
        rule = R.forward_rule_for(layer)
        if rule is not None:
            return rule, [self._forward_check(bn, user, layer, rule, None, "")]
        flat = self._flatten_like(layer)
        if flat is None:
            return _not_linear(f"{cls} '{user.layer}'")
        # BN -> Flatten -> Dense
        if user.primary != out:
            return _not_linear(f"{cls} '{user.layer}'")
        shape = user.input_shape
        fout = user.output(0)
        fusers = s.consumers(fout)
        dense_rule = R.rule_by_name("bn-flatten-dense")
        results: list[_Plan | Reason] = []
        dense = {
            f.layer
            for f in fusers
            if (lay := s.live_layer(f.layer)) is not None and dense_rule.kind.matches(lay)
        }
        if not dense:
            return tagged(
                "unsupported-layer", f"{cls} '{user.layer}' is not followed by Dense layers only"
            )
        if shape is None or any(d is None for d in shape[1:]):
            results.append(
                tagged("axis-mismatch", f"input shape of '{user.layer}' is not fully known")
            )
            return dense_rule, results
        if s.is_output(fout):
            results.append(tagged("shared-output", f"output of '{user.layer}' is a model output"))
            return dense_rule, results
        feats = flat_affine(
            bn.ready()[0],
            tuple(int(d) for d in shape[1:] if d is not None),
            bn.axes,
            flat == "channels_first",
            norm=bn.kind,
        )
        if isinstance(feats, str):
            results.append(feats)
            return dense_rule, results
        for f in fusers:
            lay = s.live_layer(f.layer)
            if f.layer not in dense:
                fcls = type(lay).__name__ if lay is not None else s.class_name(f.layer)
                results.append(_not_linear(f"{fcls} '{f.layer}' (via {cls} '{user.layer}')"))
                continue
            results.append(
                self._forward_check(bn, f, lay, dense_rule, feats, f"via {cls} '{user.layer}'")
            )
        return dense_rule, results

    def _flatten_like(self, layer: Any) -> str | None:
        """'channels_last'/'channels_first' for a Flatten (or a 1-D Reshape), else None."""
        L = self.fl.layers
        if type(layer) is L.Flatten:
            return "channels_first" if self.fl.flatten_channels_first(layer) else "channels_last"
        if type(layer) is L.Reshape and len(tuple(layer.target_shape)) == 1:
            return "channels_last"
        return None

    def _forward_check(
        self, bn: _BN, user: Node, layer: Any, rule: R.Rule, flat: Affine | None, detail: str
    ) -> _Plan | Reason:
        """A plan for folding ``bn`` into ``layer`` (``flat``: the BN's affine per feature
        of a Flatten in between), or why not."""
        s = bn.scope
        aff, axis, rank = bn.ready()
        if rule.name in self.options.skip_rules:
            return tagged("rule-skipped", f"rule {rule.name} is disabled")
        if len(s.nodes(user.layer)) != 1:
            return tagged("shared-output", f"layer '{user.layer}' is shared by several call sites")
        if user.primary is None:
            return tagged("shared-output", f"layer '{user.layer}' takes several inputs")
        bad = rule.check(layer)
        if bad:
            return bad
        if flat is None and bn.axes:  # one scalar (no axes) goes on every input channel
            ch = rule.kind.channel_axis(layer, rank)
            if bn.axis is None:
                return tagged(
                    "axis-mismatch",
                    f"{bn.kind} varies over {bn.axes_text()}, not only the input channel "
                    f"axis of '{user.layer}' (axis {ch} of rank {rank})",
                )
            if axis != ch:
                return tagged(
                    "axis-mismatch",
                    f"BN axis {bn.raw_axis} is not the input channel axis of '{user.layer}' "
                    f"(axis {ch} of rank {rank})",
                )
        w = self.store.get(s, user.layer, layer)
        plan = rule.plan(
            layer,
            w,
            flat if flat is not None else aff,
            norm=bn.kind,
            in_shape=user.input_shape,
            per_feature=flat is not None,
        )
        if isinstance(plan, str):
            return plan
        if not isinstance(plan, ForwardPlan):
            raise FusionInvariantError(f"rule {rule.name} planned a backward fold forward")
        return (user, rule, plan, ", ".join(x for x in (detail, rule.detail(plan)) if x))

    # -- rebuild ---------------------------------------------------------------------

    def _custom_objects(self) -> dict[str, Any]:
        objs: dict[str, Any] = {}
        fl = self.fl
        for layer in fl.flatten_layers(self.model):
            cls = type(layer)
            if not fl.builtin_module(cls.__module__):
                objs[cls.__name__] = cls
                objs[fl.registered_name(cls)] = cls
            act = getattr(layer, "activation", None)
            if callable(act) and not fl.builtin_module(getattr(act, "__module__", "keras")):
                objs[getattr(act, "__name__", repr(act))] = act
        return objs

    def _rebuild(self) -> Any:
        cls = type(self.model)
        # The model is already in memory: rebuilding its Lambda layers from our own copy of
        # its config runs no code that is not already loaded, so safe mode is off here.
        with self.fl.rebuild_scope(self._custom_objects()):
            new = cls.from_config(copy.deepcopy(self.config))
        self._copy_weights(self.model, new, "")
        return new

    def _copy_weights(self, old_model: Any, new_model: Any, path: str) -> None:
        for layer in new_model.layers:
            name = layer.name
            try:
                old = old_model.get_layer(name)
            except ValueError:
                old = None
            if is_graph_model(layer):
                if old is None:
                    raise FusionInvariantError(f"nested model '{name}' lost its original")
                self._copy_weights(old, layer, _join(path, name))
                continue
            folded = self.store.rounded(path, name)
            if folded is not None:
                for v in layer.weights:
                    vname = self.fl.var_name(v, layer)
                    if vname not in folded:
                        raise FusionInvariantError(
                            f"no folded value for variable '{vname}' of layer '{name}'"
                        )
                    if tuple(v.shape) != folded[vname].shape:
                        raise FusionInvariantError(
                            f"folded '{name}/{vname}' has shape {folded[vname].shape}, "
                            f"expected {tuple(v.shape)}"
                        )
                    v.assign(folded[vname])
                continue
            if old is None or type(old) is not type(layer):
                if layer.weights:
                    raise FusionInvariantError(f"layer '{name}' has no original to copy from")
                continue
            try:
                self.fl.copy_variables(old, layer)
            except ValueError as exc:
                raise FusionInvariantError(str(exc)) from None

    def _postcondition(self, new_model: Any, folds: list[Fold]) -> None:
        before = sum(1 for _ in _iter_affines(self.fl, self.model))
        after = sum(1 for _ in _iter_affines(self.fl, new_model))
        if after != before - len(folds):
            raise FusionInvariantError(
                f"{before} BN/affine layers before, {len(folds)} folded, but {after} remain"
            )


def _shared_reason(
    s: Scope, calls: int, srcs: list[tuple[str, int, int]], pname: str
) -> Reason | None:
    """Why the tensors from layer ``pname`` into the BN's ``calls`` call sites (``srcs``)
    cannot disappear in a backward fold (None: each is read by the BN only)."""
    if calls > 1 and (any(r[0] != pname for r in srcs) or len({r[1] for r in srcs}) != calls):
        return tagged(
            "shared-output", "BN layer is shared by several call sites with different inputs"
        )
    if len(s.nodes(pname)) != calls:
        return tagged("shared-output", f"layer '{pname}' is shared by several call sites")
    for ref in srcs:
        if ref[2] != 0:
            return tagged("shared-output", f"'{pname}' has several outputs")
        if len(s.consumers(ref)) != 1:
            return tagged("shared-output", f"output of '{pname}' is also used by other layers")
        if s.is_output(ref):
            return tagged("shared-output", f"output of '{pname}' is also a model output")
    return None


_ONE_INPUT = tagged("unsupported-layer", "BN input is not a single tensor")


def _not_linear(what: str) -> Reason:
    return tagged("unsupported-layer", f"{what} is not a linear layer")


def _none_before(why: str) -> Reason:
    """Why no layer before the BN can take it (said only inside a no-partner refusal)."""
    return tagged("no-partner", f"before: {why}")


def _none_after(why: str) -> Reason:
    """Why no layer after the BN can take it (said only inside a no-partner refusal)."""
    return tagged("no-partner", f"after: {why}")


def _iter_affines(fl: Flavor, model: Any) -> Iterator[Any]:
    for layer in fl.flatten_layers(model, include_self=False):
        if affine_kind(fl, layer) is not None:
            yield layer


def fuse(model: Any, options: FuseOptions) -> PassResult:
    """Fold every foldable BN of ``model`` (a built Functional/Sequential model)."""
    check_rewritable(model)
    return _Pass(model, options).run()
