"""BN statistics of a Keras model: collect each BatchNormalization layer's input, set new ones.

Inputs are collected with a sub-model whose outputs are the BN layers' inputs, called
with ``training=False`` feed by feed and reduced at once into
:class:`~bnfuse.stats.Moments`. Data are channels-last, as the model takes them.

Sites are the BN layers of the top-level graph called exactly once; BNs inside nested
models or other layers are reported as not checked by :mod:`bnfuse.calibrate`. Keras 3 and
Keras 2 (``tf_keras``) models alike, through :mod:`bnfuse.keras.compat`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bnfuse.backend import FuseOptions
from bnfuse.keras import fuse as _fuse
from bnfuse.keras import rules as _rules
from bnfuse.keras.compat import Flavor, flavor_of
from bnfuse.keras.runtime import input_names
from bnfuse.stats import Moments, Site

__all__ = ["KerasCollector"]


def _history(t: Any) -> tuple[Any, Any] | None:
    hist = getattr(t, "_keras_history", None)
    if hist is None:
        return None
    op = getattr(hist, "operation", None) or getattr(hist, "layer", None)  # Keras 3 / 2
    nodes = getattr(op, "_inbound_nodes", [])
    if hist.node_index >= len(nodes):
        return None
    return op, nodes[hist.node_index]


def _node_inputs(node: Any) -> list[Any]:
    """The tensors a Keras node was called with: Keras 2's ``keras_inputs`` (its
    ``input_tensors`` of an InputLayer's node is that layer's own output, which would make
    the walk below loop), else Keras 3's ``input_tensors``."""
    tensors = getattr(node, "keras_inputs", None)
    if tensors is None:
        tensors = getattr(node, "input_tensors", [])
    return list(tensors) if isinstance(tensors, list | tuple) else [tensors]


class KerasCollector:
    """The BatchNormalization sites of a Functional/Sequential model (see
    :mod:`bnfuse.calibrate`)."""

    def __init__(self, model: Any) -> None:
        self.sites: list[Site] = []
        self.fl: Flavor = flavor_of(model)
        bns = [la for la in model.layers if self.fl.is_bn(la)]
        ids = {id(la) for la in bns}
        memo: dict[int, int] = {}

        def depth(t: Any) -> int:
            """Depth of the deepest BN that produced ``t`` (iterative: graphs can be deep)."""
            stack = [t]
            while stack:
                found = _history(stack[-1])
                if found is None or id(found[1]) in memo:
                    stack.pop()
                    continue
                op, node = found
                hists = [_history(x) for x in _node_inputs(node)]
                ins = [h for h in hists if h is not None]
                pending = [
                    x
                    for x, h in zip(_node_inputs(node), hists, strict=True)
                    if h is not None and id(h[1]) not in memo
                ]
                if pending:
                    stack.extend(pending)
                    continue
                d = max((memo[id(h[1])] for h in ins), default=0)
                memo[id(node)] = d + 1 if id(op) in ids else d
                stack.pop()
            top = _history(t)
            return memo.get(id(top[1]), 0) if top is not None else 0

        for la in bns:
            self._add_site(la, depth)
        self._inner(model, "")

    def _inner(self, model: Any, path: str) -> None:
        """BNs inside nested models and other layers: sites that are not run (their
        weights alone are still checked)."""
        for la in model.layers:
            if self.fl.is_bn(la):
                if path:
                    self._add_site(la, None, f"inside nested model '{path}': not run", path)
                continue
            scope = f"{path}/{la.name}" if path else la.name
            if isinstance(la, self.fl.model_cls) and hasattr(la, "layers"):
                self._inner(la, scope)
                continue
            for sub in self.fl.flatten_layers(la, False):
                if self.fl.is_bn(sub):
                    self._add_site(sub, None, f"inside layer '{scope}': not run", scope)

    def _add_site(self, layer: Any, depth: Any, reason: str = "", scope: str = "") -> None:
        d = 1
        calls = len(getattr(layer, "_inbound_nodes", []))
        if reason:
            pass
        elif not self.fl.is_plain_bn(layer):
            reason = f"subclass of BatchNormalization ({type(layer).__name__})"
        elif calls != 1:
            reason = f"shared layer (called {calls} times)"
        else:
            d = depth(layer.output)
        axis = self.fl.bn_axis(layer)
        keep = tuple(int(a) for a in axis) if isinstance(axis, list | tuple) else (int(axis),)
        _np = self.fl.to_numpy
        mean = _np(layer.moving_mean)
        self.sites.append(
            Site(
                name=layer.name,
                keep=keep,
                channels=int(mean.size),
                eps=self.fl.bn_epsilon(layer),
                mean=mean,
                var=_np(layer.moving_variance),
                gamma=_np(layer.gamma) if layer.scale else None,
                beta=_np(layer.beta) if layer.center else None,
                depth=d,
                reason=reason,
                scope=scope,
            )
        )

    def collect(
        self, model: Any, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
    ) -> dict[str, Moments]:
        """Moments of the inputs of the BN layers ``names`` over every feed."""
        layers = [model.get_layer(n) for n in names]
        sub = self.fl.model_cls(model.inputs, [la.input for la in layers])
        order = input_names(model)
        keep = {s.name: s.keep for s in self.sites}
        acc: dict[str, Moments] = {}
        for feed in feeds:
            flat = [np.asarray(feed[n]) for n in order]
            outs = sub(flat, training=False)  # a list, as the sub-model's inputs are
            outs = outs if isinstance(outs, list | tuple) else [outs]
            for name, out in zip(names, outs, strict=True):
                m = Moments.of(self.fl.to_numpy(out), keep[name])
                acc[name] = acc[name].merge(m) if name in acc else m
        return acc

    def with_stats(self, model: Any, new: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Any:
        """A copy of ``model`` whose BN layers ``new`` have the given moving mean and
        variance (rounded once to the variables' dtype); ``model`` is unchanged."""
        # bnfuse's own rebuild (from the config, every variable copied exactly), with
        # every rule skipped: the copy a fold would start from, Lambda layers included
        skip = FuseOptions(skip_rules=frozenset(_rules.rule_names()))
        clone = _fuse.fuse(model, skip).model
        for name, (mean, var) in new.items():
            layer = clone.get_layer(name)
            for v, value in ((layer.moving_mean, mean), (layer.moving_variance, var)):
                dtype = self.fl.dtype(v)
                v.assign(np.asarray(value, dtype=np.float64).reshape(tuple(v.shape)).astype(dtype))
        return clone

    @staticmethod
    def kernels(model: Any, fold: Any) -> list[np.ndarray] | None:
        """The kernels (weights of rank >= 2) of the layers ``fold`` went into."""
        try:
            scope = model
            for part in [p for p in fold.scope.split("/") if p]:
                scope = scope.get_layer(part)
            layers = [scope.get_layer(n) for n in fold.into.split(", ")]
        except (ValueError, AttributeError):
            return None
        return [np.asarray(w) for la in layers for w in la.get_weights() if np.ndim(w) >= 2]
