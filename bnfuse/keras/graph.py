"""An editable view of a Keras model's config: who calls which layer on what.

bnfuse rewrites a Keras model by editing the config that ``model.get_config()`` returns
(the same config ``.keras`` files store) and rebuilding the model with ``from_config``;
weights are copied afterwards (see :mod:`bnfuse.keras.fuse`). This module only reads and
edits that config. It never imports tensorflow itself; layer objects come in from the
caller.

A *scope* is one Functional or Sequential graph (the model, or a model nested in it as a
layer). Inside a scope a tensor is named by Keras's own ``keras_history`` triple
``(layer name, node index, tensor index)``; a *node* is one call of a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INPUT", "Node", "Scope", "TensorRef"]

TensorRef = tuple[str, int, int]

#: Pseudo layer name for the input of a Sequential model that has no InputLayer entry.
INPUT = "<input>"


@dataclass
class Node:
    """One call of a layer inside a scope."""

    layer: str
    index: int  # the node index other layers use to refer to this call's outputs
    inputs: list[TensorRef]  # every tensor in args and kwargs
    primary: TensorRef | None  # args[0] when it is the only tensor the call takes
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int | None, ...] | None = None  # shape of ``primary`` (batch incl.)

    def output(self, tensor_index: int = 0) -> TensorRef:
        return (self.layer, self.index, tensor_index)


def _is_keras_tensor(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__"


def _walk_tensors(obj: Any) -> Iterator[dict[str, Any]]:
    if _is_keras_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _walk_tensors(v)


def _ref(tensor: dict[str, Any]) -> TensorRef:
    h = tensor["config"]["keras_history"]
    return (str(h[0]), int(h[1]), int(h[2]))


def _is_k2_ref(obj: Any) -> bool:
    """A Keras 2 tensor reference: ``[layer, node, tensor]`` or ``[..., call kwargs]``."""
    return (
        isinstance(obj, list)
        and len(obj) in (3, 4)
        and isinstance(obj[0], str)
        and isinstance(obj[1], int)
        and isinstance(obj[2], int)
        and (len(obj) == 3 or isinstance(obj[3], dict))
    )


def _k2_refs(struct: Any) -> Iterator[list[Any]]:
    """Every (mutable) tensor reference in a Keras 2 node, in order, kwargs included.

    A Keras 2 node is a list of ``[layer, node, tensor, kwargs]`` entries, or, for a
    TFOpLambda called on one tensor, that one entry itself; tensors in the kwargs are
    ``[layer, node, tensor]`` lists."""
    if _is_k2_ref(struct):
        yield struct
        if len(struct) == 4:
            yield from _k2_refs(struct[3])
    elif isinstance(struct, dict):
        for v in struct.values():
            yield from _k2_refs(v)
    elif isinstance(struct, list):
        for v in struct:
            yield from _k2_refs(v)


def _k2_kwargs(nd: list[Any]) -> dict[str, Any]:
    """The call kwargs of a Keras 2 node (those of its first entry)."""
    first = nd if _is_k2_ref(nd) else (nd[0] if nd and _is_k2_ref(nd[0]) else None)
    if first is not None and len(first) == 4:
        return dict(first[3])
    return {}


def _retarget(ref: list[Any], name: str, replacement: dict[int, TensorRef]) -> None:
    """Point a Keras 2 tensor reference at ``name``'s node ``k`` to ``replacement[k]``."""
    if ref[0] == name and ref[2] == 0 and ref[1] in replacement:
        ref[0], ref[1], ref[2] = replacement[ref[1]]


def _is_leaf_ref(obj: Any) -> bool:
    return (
        isinstance(obj, list | tuple)
        and len(obj) == 3
        and isinstance(obj[0], str)
        and isinstance(obj[1], int)
        and isinstance(obj[2], int)
    )


def _walk_refs(struct: Any) -> Iterator[TensorRef]:
    if _is_leaf_ref(struct):
        yield (struct[0], struct[1], struct[2])
    elif isinstance(struct, dict):
        for v in struct.values():
            yield from _walk_refs(v)
    elif isinstance(struct, list | tuple):
        for v in struct:
            yield from _walk_refs(v)


def _shape(obj: Any) -> tuple[int | None, ...] | None:
    if obj is None:
        return None
    try:
        return tuple(None if d is None else int(d) for d in obj)
    except (TypeError, ValueError):
        return None


class Scope:
    """One Functional or Sequential graph, backed by its (mutable) config dict.

    ``config`` is edited in place; when the scope is a nested model, it is the very dict
    inside the parent's config, so edits reach the whole model's config.
    """

    def __init__(self, path: str, config: dict[str, Any], live: Any, kind: str) -> None:
        self.path = path
        self.config = config
        self.live = live  # the original keras model object of this scope (read only)
        self.kind = kind  # "functional" | "sequential"
        self._node_offset: dict[str, int] = {}
        self._cache: dict[str, list[Node]] | None = None
        self._consumers: dict[TensorRef, list[Node]] | None = None
        self._index: dict[str, dict[str, Any]] | None = None
        self._outputs: list[TensorRef] | None = None
        self._live: dict[str, Any] = {layer.name: layer for layer in live.layers}

    # -- reading ---------------------------------------------------------------------

    @property
    def entries(self) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = self.config["layers"]
        return layers

    def entry_name(self, entry: dict[str, Any]) -> str:
        if self.kind == "functional":
            return str(entry["name"])
        return str(entry["config"]["name"])

    def names(self) -> list[str]:
        """Layer names in the config's (topological) order."""
        return [self.entry_name(e) for e in self.entries]

    def entry(self, name: str) -> dict[str, Any]:
        if self._index is None:
            self._index = {self.entry_name(e): e for e in self.entries}
        return self._index[name]

    def class_name(self, name: str) -> str:
        return str(self.entry(name).get("class_name", ""))

    def set_node_offset(self, name: str, offset: int) -> None:
        """Nested Functional models number their call nodes from 1 in configs."""
        self._node_offset[name] = offset
        self._invalidate()

    def live_layer(self, name: str) -> Any:
        """The original layer object of ``name`` (None for layers bnfuse created)."""
        return self._live.get(name)

    def _parse(self, e: dict[str, Any]) -> list[Node]:
        """The call nodes of one functional config entry."""
        name = self.entry_name(e)
        off = self._node_offset.get(name, 0)
        lst = []
        for k, nd in enumerate(e.get("inbound_nodes", [])):
            if isinstance(nd, list):  # Keras 2 (Keras 3 nodes are dicts)
                lst.append(self._parse_k2(e, name, k + off, nd))
                continue
            args = nd.get("args", []) if isinstance(nd, dict) else []
            kwargs = nd.get("kwargs", {}) if isinstance(nd, dict) else {}
            tensors = list(_walk_tensors(args)) + list(_walk_tensors(kwargs))
            primary = None
            shape = None
            if len(tensors) == 1 and args and _is_keras_tensor(args[0]):
                primary = _ref(args[0])
                shape = _shape(args[0]["config"].get("shape"))
            if shape is None:
                shape = _shape((e.get("build_config") or {}).get("input_shape"))
            lst.append(
                Node(name, k + off, [_ref(t) for t in tensors], primary, dict(kwargs), shape)
            )
        return lst

    @staticmethod
    def _parse_k2(e: dict[str, Any], name: str, index: int, nd: list[Any]) -> Node:
        """One Keras 2 call node (see :func:`_k2_refs`); the input shape comes from
        ``build_config``."""
        refs: list[TensorRef] = [(str(t[0]), int(t[1]), int(t[2])) for t in _k2_refs(nd)]
        kwargs = _k2_kwargs(nd)
        primary = refs[0] if len(refs) == 1 else None
        shape = _shape((e.get("build_config") or {}).get("input_shape")) if primary else None
        return Node(name, index, refs, primary, dict(kwargs), shape)

    def _build(self) -> dict[str, list[Node]]:
        if self._cache is not None:
            return self._cache
        nodes: dict[str, list[Node]] = {}
        if self.kind == "functional":
            for e in self.entries:
                nodes[self.entry_name(e)] = self._parse(e)
        else:
            prev: TensorRef | None = None
            for i, e in enumerate(self.entries):
                name = self.entry_name(e)
                shape = _shape((e.get("build_config") or {}).get("input_shape"))
                if e.get("class_name") == "InputLayer":
                    nodes[name] = [Node(name, 0, [], None)]
                else:
                    src = prev if prev is not None else (INPUT, 0, 0)
                    if shape is None and i == 0:
                        shape = _shape(self.config.get("build_input_shape"))
                    nodes[name] = [Node(name, 0, [src], src, {}, shape)]
                prev = (name, 0, 0)
        self._cache = nodes
        return nodes

    def nodes(self, name: str) -> list[Node]:
        """Every call of layer ``name`` in this scope."""
        return self._build().get(name, [])

    def producer(self, ref: TensorRef) -> Node | None:
        """The node that produced ``ref`` (None for a Sequential's implicit input)."""
        for n in self.nodes(ref[0]):
            if n.index == ref[1]:
                return n
        return None

    def consumers(self, ref: TensorRef) -> list[Node]:
        """Every node that takes ``ref`` as an input (once per node)."""
        if self._consumers is None:
            cons: dict[TensorRef, list[Node]] = {}
            for lst in self._build().values():
                for n in lst:
                    for r in dict.fromkeys(n.inputs):
                        cons.setdefault(r, []).append(n)
            self._consumers = cons
        return list(self._consumers.get(ref, []))

    def outputs(self) -> list[TensorRef]:
        """The scope's output tensors."""
        if self._outputs is None:
            if self.kind == "functional":
                self._outputs = list(_walk_refs(self.config["output_layers"]))
            else:
                names = self.names()
                self._outputs = [(names[-1], 0, 0)] if names else []
        return list(self._outputs)

    def inputs(self) -> list[TensorRef]:
        if self.kind == "functional":
            return list(_walk_refs(self.config["input_layers"]))
        names = self.names()
        if names and self.entries[0].get("class_name") == "InputLayer":
            return [(names[0], 0, 0)]
        return [(INPUT, 0, 0)]

    def is_output(self, ref: TensorRef) -> bool:
        if self._outputs is None:
            self.outputs()
        return ref in (self._outputs or ())

    # -- editing ---------------------------------------------------------------------

    def _invalidate(self) -> None:
        self._cache = None
        self._consumers = None
        self._index = None
        self._outputs = None

    def remove(self, name: str, replacement: dict[int, TensorRef]) -> None:
        """Delete layer ``name``; its node ``k``'s output is replaced by ``replacement[k]``.

        Only for single-output layers whose outputs are not scope outputs (those are
        replaced by an Identity instead, see :meth:`replace_with_identity`).
        """
        entries = self.entries
        idx = next(i for i, e in enumerate(entries) if self.entry_name(e) == name)
        if self.kind == "sequential":
            del entries[idx]
            self._invalidate()
            return
        affected = {n.layer for k in replacement for n in self.consumers((name, k, 0))}
        del entries[idx]
        cache = self._build()
        del cache[name]
        for lname in affected:
            e = self.entry(lname)
            for nd in e.get("inbound_nodes", []):
                if isinstance(nd, list):
                    for ref in _k2_refs(nd):
                        _retarget(ref, name, replacement)
            for t in _walk_tensors(e.get("inbound_nodes", [])):
                r = _ref(t)
                if r[0] == name and r[2] == 0 and r[1] in replacement:
                    t["config"]["keras_history"] = list(replacement[r[1]])
            cache[lname] = self._parse(e)
        self._consumers = None
        self._index = None
        self._outputs = None

    def replace_with_identity(self, name: str, dtype: Any) -> None:
        """Turn layer ``name`` into an ``Identity`` of the same name (keeps its calls)."""
        e = self.entry(name)
        new: dict[str, Any] = {
            "module": "keras.layers",
            "class_name": "Identity",
            "config": {"name": name, "trainable": True, "dtype": dtype},
            "registered_name": None,
        }
        if "build_config" in e:
            new["build_config"] = e["build_config"]
        if self.kind == "functional":
            new["name"] = name
            # the BN's call kwargs (mask, training) mean nothing to an Identity
            new["inbound_nodes"] = [
                {"args": nd.get("args", []), "kwargs": {}}
                if isinstance(nd, dict)
                else [[*t[:3], {}] for t in nd if _is_k2_ref(t)]
                for nd in e.get("inbound_nodes", [])
            ]
        e.clear()
        e.update(new)
        self._invalidate()

    def set_layer_config(self, name: str, **changes: Any) -> None:
        self.entry(name)["config"].update(changes)
