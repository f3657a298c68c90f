"""BN statistics of an ONNX model: collect each BatchNormalization's input, set new ones.

The inputs are collected from a copy of the model in which every wanted BN input is also
a graph output, run by onnxruntime with graph optimizations DISABLED (at its default level
onnxruntime would fold Conv+BN itself and the tensors would not exist), feed by feed,
reduced at once into :class:`~bnfuse.stats.Moments` (memory does not grow with the data).

Only BatchNormalization nodes of the main graph are sites; those in subgraphs and
functions are reported as not checked by :mod:`bnfuse.calibrate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfuse.onnx.backend import OrtRunner
from bnfuse.onnx.graph import SUBGRAPH_OPS, node_label, subgraphs
from bnfuse.onnx.storage import OnnxModel, is_placeholder
from bnfuse.stats import Moments, Site

__all__ = ["OnnxCollector"]

F64 = np.ndarray


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return node.op_type in SUBGRAPH_OPS or next(subgraphs(node), None) is not None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class OnnxCollector:
    """The BatchNormalization sites of an ONNX model's main graph (see :mod:`bnfuse.calibrate`)."""

    def __init__(self, model: OnnxModel) -> None:
        graph = model.proto.graph
        inits = {t.name: t for t in graph.initializer}
        depth: dict[str, int] = {}
        running = 0
        self.sites: list[Site] = []
        self._x: dict[str, str] = {}  # site name -> the BN's input tensor
        for node in graph.node:
            ins = [depth.get(i, 0) for i in node.input if i]
            d = max(ins, default=0)
            if _has_subgraph(node):  # its subgraphs may read any earlier value
                d = running
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                d = depth.get(node.input[0], 0) + 1 if node.input else 1
                self._add_site(model, node, inits, d)
            running = max(running, d)
            for o in node.output:
                depth[o] = d

    def _add_site(
        self, model: OnnxModel, node: onnx.NodeProto, inits: Mapping[str, Any], depth: int
    ) -> None:
        name = node_label(node)
        arrays: list[np.ndarray | None] = []
        reason = ""
        for i in range(1, 5):
            t = inits.get(node.input[i]) if len(node.input) > i else None
            if t is None:
                reason = "its statistics are not initializers (computed in the graph)"
                break
            arr = model.payloads.array(t) if is_placeholder(t) and model.payloads else None
            arrays.append(arr if arr is not None else numpy_helper.to_array(t))
        if not reason and _attr(node, "training_mode", 0):
            reason = "training_mode=1 (normalizes with batch statistics)"
        if not reason and not _attr(node, "spatial", 1):
            reason = "spatial=0 (opset < 9 per-element statistics)"
        if not node.input or not node.input[0]:
            reason = reason or "no input"
        gamma, beta, mean, var = arrays if len(arrays) == 4 else (None,) * 4
        channels = int(np.asarray(mean).size) if mean is not None else 0
        self.sites.append(
            Site(
                name=name,
                keep=(1,),
                channels=channels,
                eps=float(_attr(node, "epsilon", 1e-5)),
                mean=mean,
                var=var,
                gamma=gamma,
                beta=beta,
                depth=depth,
                reason=reason,
            )
        )
        self._x[name] = node.input[0] if node.input else ""

    def collect(
        self, model: OnnxModel, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
    ) -> dict[str, Moments]:
        """Moments of the inputs of the BNs ``names`` over every feed."""
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        graph_inputs = {i.name for i in proto.graph.input}
        outputs = {o.name for o in proto.graph.output}
        fetch: list[str] = []
        for name in names:
            x = self._x[name]
            if x in graph_inputs or x in fetch:
                continue
            if x not in outputs:
                vi = onnx.ValueInfoProto()
                vi.name = x  # no type: onnxruntime takes the type it computes
                proto.graph.output.append(vi)
            fetch.append(x)
        runner = OrtRunner(OnnxModel(proto, model.payloads))
        keep = {s.name: s.keep for s in self.sites}
        acc: dict[str, Moments] = {}
        for feed in feeds:
            got = (
                dict(zip(fetch, runner.session.run(fetch, dict(feed)), strict=True))
                if fetch
                else {}
            )
            for name in names:
                x = self._x[name]
                arr = feed[x] if x in graph_inputs else got[x]
                m = Moments.of(arr, keep[name])
                acc[name] = acc[name].merge(m) if name in acc else m
        return acc

    def with_stats(self, model: OnnxModel, new: Mapping[str, tuple[F64, F64]]) -> OnnxModel:
        """A copy of ``model`` whose BNs ``new`` have the given moving mean and variance
        (rounded once to the dtype of the statistics they replace); ``model`` is unchanged."""
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        graph = proto.graph
        uses: dict[str, int] = {}
        for node in graph.node:
            for i in node.input:
                uses[i] = uses.get(i, 0) + 1
        inits = {t.name: t for t in graph.initializer}
        taken = set(inits) | {o for n in graph.node for o in n.output}
        for node in graph.node:
            name = node_label(node)
            if node.op_type != "BatchNormalization" or name not in new:
                continue
            for slot, value in zip((3, 4), new[name], strict=True):
                old = inits[node.input[slot]]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
                arr = np.asarray(value, dtype=np.float64).reshape(tuple(old.dims)).astype(dtype)
                if uses.get(old.name, 0) == 1:  # this BN's own tensor: replace it in place
                    old.CopyFrom(numpy_helper.from_array(arr, old.name))
                    continue
                fresh = f"{old.name}__recalibrated"
                k = 1
                while fresh in taken:
                    k += 1
                    fresh = f"{old.name}__recalibrated{k}"
                taken.add(fresh)
                graph.initializer.append(numpy_helper.from_array(arr, fresh))
                node.input[slot] = fresh
        return OnnxModel(proto, model.payloads)

    @staticmethod
    def kernels(model: OnnxModel, fold: Any) -> list[np.ndarray] | None:
        """The constant weight arrays (inputs 0 and 1) of the main-graph nodes ``fold``
        went into, or None when they cannot be read (a subgraph, a renamed node)."""
        if fold.scope:
            return None
        graph = model.proto.graph
        inits = {t.name: t for t in graph.initializer}
        wanted = set(fold.into.split(", "))
        found: dict[str, list[np.ndarray]] = {}
        for node in graph.node:
            label = node_label(node)
            if label not in wanted:
                continue
            arrays = []
            for i in node.input[:2]:
                t = inits.get(i)
                if t is None:
                    continue
                if is_placeholder(t):
                    if model.payloads is None:
                        return None
                    arrays.append(np.asarray(model.payloads.array(t)))
                else:
                    arrays.append(numpy_helper.to_array(t))
            found[label] = arrays
        if set(found) != wanted:
            return None
        return [a for label in sorted(found) for a in found[label]]
