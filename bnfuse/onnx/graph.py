"""An index over one ONNX graph: producers, consumers, constants, and safe weight writes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfuse.fold import Scaled, round_to
from bnfuse.onnx.constants import Computed, computable, computed_reason
from bnfuse.onnx.storage import DATA_FIELDS, INLINE_LIMIT, Payloads, is_placeholder, raw_dtype
from bnfuse.reasons import Reason, tagged

__all__ = [
    "Graph",
    "MalformedNodeError",
    "NameSource",
    "node_label",
    "outer_names_used",
    "subgraphs",
]

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def node_label(node: onnx.NodeProto) -> str:
    """A stable, readable name for a node (its name, or op type and first output)."""
    if node.name:
        return node.name
    out = node.output[0] if node.output else "?"
    return f"{node.op_type}->{out}"


#: how many initializer values Graph.const keeps (weight + BN statistics of one fold)
_RECENT = 6

#: the standard ops with graph attributes (other domains are checked attribute by attribute)
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraph_slots(node: onnx.NodeProto) -> Iterator[tuple[str, int | None, onnx.GraphProto]]:
    """Every graph a node's attributes hold (If branches, Loop/Scan bodies), as
    (attribute name, index in a GRAPHS list or None for a GRAPH attribute, graph)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, None, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for j, sub in enumerate(attr.graphs):
                yield attr.name, j, sub


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for _, _, sub in subgraph_slots(node):
        yield sub


def outer_names_used(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define itself (outer-scope references)."""
    defined = {i.name for i in g.input} | {i.name for i in g.initializer}
    used: set[str] = set()
    for node in g.node:
        defined.update(o for o in node.output if o)
    for node in g.node:
        used.update(i for i in node.input if i)
        for sub in subgraphs(node):
            used |= outer_names_used(sub)
    used.update(o.name for o in g.output)
    return used - defined


class NameSource:
    """Deterministic, collision-free names for new tensors and nodes across a whole model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()

        def walk(g: onnx.GraphProto) -> None:
            self.taken.update(t.name for t in g.initializer)
            self.taken.update(v.name for v in g.input)
            self.taken.update(v.name for v in g.output)
            self.taken.update(v.name for v in g.value_info)
            for n in g.node:
                self.taken.add(n.name)
                self.taken.update(n.input)
                self.taken.update(n.output)
                for sub in subgraphs(n):
                    walk(sub)

        walk(model.graph)
        for f in model.functions:
            for n in f.node:
                self.taken.add(n.name)
                self.taken.update(n.input)
                self.taken.update(n.output)

    def new(self, base: str) -> str:
        """``base`` if free, else ``base_1``, ``base_2``, ..."""
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


@dataclass
class Graph:
    """Index of one graph. Rebuild it (``Graph(...)``) after structural rewrites.

    ``outer`` is the enclosing graph's index for subgraphs: its constants count as
    constants here, its consumers of names see this graph's uses. ``function`` marks the
    body of a model-local function (wrapped in a GraphProto): its inputs are not
    constants and every constant it gains is a ``Constant`` node.
    """

    g: onnx.GraphProto
    names: NameSource
    treat_initializer_inputs_as_constants: bool = False
    outer: Graph | None = None
    shapes: Mapping[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    #: True for a function body: no initializers, new constants become Constant nodes.
    function: bool = False
    #: the data of placeholder tensors (see :mod:`bnfuse.onnx.storage`), shared by the
    #: main graph and its subgraphs; the main graph's large new weights are stored there
    payloads: Payloads | None = None
    #: element types by tensor name (shape inference), for computed constants' CastLike
    types: Mapping[str, int] = field(default_factory=dict)
    #: the graph's default-domain opset (0: unknown), for evaluating computed constants
    opset: int = 0
    producer: dict[str, onnx.NodeProto] = field(init=False)
    consumers: dict[str, list[onnx.NodeProto]] = field(init=False)
    inits: dict[str, onnx.TensorProto] = field(init=False)
    input_names: set[str] = field(init=False)
    output_names: set[str] = field(init=False)
    _recent: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    #: values of constants the graph computes (see :mod:`bnfuse.onnx.constants`)
    computed: Computed = field(init=False, default_factory=Computed)

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        """Recompute producer/consumer maps."""
        self.producer = {}
        self.consumers = {}
        for node in self.g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            seen: set[str] = set()
            for i in node.input:
                if i and i not in seen:
                    self.consumers.setdefault(i, []).append(node)
                    seen.add(i)
            if node.op_type not in SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
                continue  # only these standard ops have graph attributes
            for sub in subgraphs(node):
                for name in outer_names_used(sub) - seen:
                    self.consumers.setdefault(name, []).append(node)
                    seen.add(name)
        self.inits = {t.name: t for t in self.g.initializer}
        self.input_names = {i.name for i in self.g.input}
        self.output_names = {o.name for o in self.g.output}

    # ---- queries -------------------------------------------------------------------
    def uses(self, name: str) -> int:
        """How many node inputs (counting repeats) and graph outputs read ``name``."""
        n = sum(list(node.input).count(name) for node in self.consumers.get(name, []))
        n += sum(
            1
            for node in self.consumers.get(name, [])
            if name not in node.input  # used only from a subgraph
        )
        return n + (1 if name in self.output_names else 0)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node reading ``name`` once, when nothing else (graph output) does."""
        cons = self.consumers.get(name, [])
        if len(cons) != 1 or name in self.output_names or self.uses(name) != 1:
            return None
        return cons[0]

    def intermediate_reason(self, name: str, what: str) -> Reason | None:
        """Why the tensor between two nodes cannot disappear, or None."""
        if name in self.output_names:
            return tagged("shared-output", f"{what} output {name!r} is a graph output")
        if self.uses(name) > 1:
            return tagged("shared-output", f"{what} output {name!r} has other consumers")
        return None

    def const_reason(self, name: str) -> Reason | None:
        """None when ``name`` is a constant (initializer or Constant node), else why not."""
        if name == "":
            return tagged("not-constant", "missing input")
        if name in self.inits:
            if name in self.input_names and not self.treat_initializer_inputs_as_constants:
                return tagged(
                    "not-constant",
                    f"{name!r} is an initializer also listed as a graph input (overridable); "
                    "pass --treat-initializer-inputs-as-constants if it is fixed",
                )
            return None
        prod = self.producer.get(name)
        if prod is not None:
            if (
                prod.op_type == "Constant"
                and prod.domain in ("", "ai.onnx")
                and _constant_value(prod) is not None
            ):
                return None
            if prod.op_type == "Constant":
                return tagged(
                    "not-constant", f"{name!r} is computed by a {prod.op_type} node, not a constant"
                )
            return computed_reason(self, name)  # a subgraph of constants, or why not
        if name in self.input_names:
            where = "function input" if self.function else "graph input"
            return tagged("not-constant", f"{name!r} is a {where}, not a constant")
        if self.outer is not None:
            return self.outer.const_reason(name)
        return tagged("not-constant", f"{name!r} is not defined")

    def stored_weight(self, name: str) -> bool:
        """True for a stored tensor: a constant, or an initializer also listed as an input.

        Used to decide what counts as a linear *layer* (a node with a stored weight), so
        that a normalization next to an overridable weight is still reported.
        """
        if not name:
            return False
        if name in self.inits:
            return True
        prod = self.producer.get(name)
        if prod is not None and prod.op_type != "Constant":
            return computable(self, name)  # by structure: no weight is evaluated here
        if self.const_reason(name) is None:
            return True
        if name in self.producer or name in self.input_names:
            return False
        return self.outer is not None and self.outer.stored_weight(name)

    def const(self, name: str) -> np.ndarray:
        """Value of a constant (check :meth:`const_reason` first).

        The last few initializer values read are cached (a fold reads its weight when
        checking and again when rewriting); writes through this index invalidate them.
        """
        if name in self.inits:
            cached = self._recent.get(name)
            if cached is not None:
                return cached
            arr = self._to_array(self.inits[name])
            self._recent[name] = arr
            while len(self._recent) > _RECENT:
                del self._recent[next(iter(self._recent))]
            return arr
        prod = self.producer.get(name)
        if prod is not None:
            tensor = _constant_value(prod)
            if tensor is not None:
                return self._to_array(tensor)
        if name in self.computed.values:
            return self.computed.values[name]
        if self.outer is not None:
            return self.outer.const(name)
        raise KeyError(name)

    def const_dtype(self, name: str) -> int:
        """ONNX element type of a constant."""
        if name in self.inits:
            return int(self.inits[name].data_type)
        prod = self.producer.get(name)
        if prod is not None:
            tensor = _constant_value(prod)
            if tensor is not None:
                return int(tensor.data_type)
        if name in self.computed.values:
            return onnx.helper.np_dtype_to_tensor_dtype(self.computed.values[name].dtype)
        if self.outer is not None:
            return self.outer.const_dtype(name)
        raise KeyError(name)

    def rank(self, name: str, _depth: int = 0) -> int | None:
        """Rank of a tensor when it is provable, or when shape inference knows it.

        Proven first, from the graph itself (shape inference is then never run for it):
        an initializer's or a declared graph input's rank; a Conv or ConvTranspose output
        has its weight's rank, a Gemm output rank 2, a MatMul with a 2-D weight keeps
        its input's rank (>= 2), and element-wise ops with a constant of no larger rank,
        BatchNormalization and Relu-like ops keep their input's rank.
        """
        if not name:
            return None
        proven = self._proven_rank(name, _depth)
        if proven is not None:
            return proven
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    def _proven_rank(self, name: str, _depth: int) -> int | None:
        if name in self.inits:
            return len(self.inits[name].dims)
        prod = self.producer.get(name)
        if prod is None:
            if name in self.input_names:
                return self._declared_rank(name)
            if self.outer is None:
                return None
            return self.outer.rank(name, _depth)
        if _depth > 64 or prod.domain not in ("", "ai.onnx"):
            return None
        op = prod.op_type
        if op == "Constant" and self.const_reason(name) is None:
            return len(self._dims(name))
        if op in ("Conv", "ConvTranspose") and len(prod.input) > 1:
            w = prod.input[1]
            if self._unevaluated(w):
                return None  # not evaluated just for a rank: shape inference knows it
            if self.const_reason(w) is None or w in self.inits:
                return len(self._dims(w))
            return None
        if op == "Gemm":
            return 2
        if op == "MatMul" and len(prod.input) == 2:
            if self._unevaluated(prod.input[1]):
                return None
            if self.const_reason(prod.input[1]) is not None and prod.input[1] not in self.inits:
                return None
            if len(self._dims(prod.input[1])) != 2:
                return None
            return self.rank(prod.input[0], _depth + 1)  # [.., K] @ [K, N] -> [.., N]
        if op in _RANK_KEEPING and prod.input and prod.output[0] == name:
            # (only the first output: a training BatchNormalization's others are vectors)
            return self.rank(prod.input[0], _depth + 1)
        if op in ("Mul", "Add", "Sub", "Div") and len(prod.input) == 2:
            a, b = prod.input
            ca, cb = self.const_reason(a) is None, self.const_reason(b) is None
            if ca == cb:
                return None
            x, c = (b, a) if ca else (a, b)
            r = self.rank(x, _depth + 1)
            if r is None:
                return None
            return max(r, len(self._dims(c)))
        return None

    def _unevaluated(self, name: str) -> bool:
        """A computed tensor (see :mod:`bnfuse.onnx.constants`) not evaluated yet."""
        prod = self.producer.get(name)
        return (
            prod is not None
            and prod.op_type != "Constant"
            and name not in self.computed.values
            and name not in self.computed.reasons
        )

    def _declared_rank(self, name: str) -> int | None:
        """The rank a graph input's type declares, if it declares a shape."""
        for vi in self.g.input:
            if vi.name == name:
                t = vi.type
                if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
                    return len(t.tensor_type.shape.dim)
                return None
        return None

    def _to_array(self, t: onnx.TensorProto) -> np.ndarray:
        if self.payloads is not None and is_placeholder(t):
            src = self.payloads.entry(t)
            if isinstance(src, onnx.TensorProto):  # a lazy copy's original
                return _to_array(src)
            try:
                return self.payloads.array(t, src)
            except ValueError as exc:
                raise MalformedNodeError(str(exc)) from None
        return _to_array(t)

    def _dims(self, name: str) -> tuple[int, ...]:
        if name in self.inits:
            return tuple(int(d) for d in self.inits[name].dims)
        prod = self.producer.get(name)
        tensor = _constant_value(prod) if prod is not None and prod.op_type == "Constant" else None
        if tensor is not None:  # the dims, without decoding the value
            return tuple(int(d) for d in tensor.dims)
        return tuple(int(d) for d in self.const(name).shape)

    # ---- writes --------------------------------------------------------------------
    def write_const(
        self,
        node: onnx.NodeProto,
        slot: int,
        value64: np.ndarray | Scaled,
        like: str | None,
        base: str,
    ) -> None:
        """Set ``node.input[slot]`` to a constant holding ``value64`` rounded once.

        The element type is that of constant ``like`` (the tensor being replaced), or of
        the node's weight when adding a new one. An initializer used only by this slot
        is rewritten in place (in the copy being fused); a shared one, or a Constant
        node, is left alone and a new initializer with a fresh name is created.
        Raises OverflowError when the rounded value overflows the type.
        """
        dtype_id = self.const_dtype(like) if like else onnx.TensorProto.FLOAT
        np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype_id))
        arr: np.ndarray | Scaled
        if isinstance(value64, Scaled) and value64.dtype == np_dtype:
            arr = value64  # computed when written (see bnfuse.fold.Scaled)
        else:
            arr = round_to(np.asarray(value64), np_dtype)
        old = node.input[slot] if slot < len(node.input) else ""
        if old and self._exclusively_used(old, node, slot):
            if old in self.inits:
                self._recent.pop(old, None)
                self._store(self.inits[old], arr, dtype_id)
                return
            prod = self.producer.get(old)
            value = _value_attr(prod) if prod is not None and prod.op_type == "Constant" else None
            if value is not None:
                set_tensor(value.t, arr, dtype_id)
                return
        name = self.add_const(arr, base, dtype_id)
        self.set_input(node, slot, name)

    def rounded(self, value64: np.ndarray, like: str | None) -> np.ndarray:
        """``value64`` rounded once to the element type of constant ``like`` (float when
        None). Raises OverflowError like :func:`~bnfuse.fold.round_to`; rules round every
        value of a fold first, so an overflow refuses it before anything is written."""
        dtype_id = self.const_dtype(like) if like else onnx.TensorProto.FLOAT
        return round_to(np.asarray(value64), onnx.helper.tensor_dtype_to_np_dtype(dtype_id))

    def add_const(self, arr: np.ndarray | Scaled, base: str, dtype_id: int | None = None) -> str:
        """Store a new constant under a fresh name (an initializer, or in a function
        body a ``Constant`` node placed first); return the name."""
        name = self.names.new(base)
        if dtype_id is None:
            dtype_id = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        if self.function:
            const = onnx.helper.make_node(
                "Constant", [], [name], name=self.names.new(f"{name}_const")
            )
            value = const.attribute.add()
            value.name = "value"
            value.type = onnx.AttributeProto.TENSOR
            value.t.name = name
            set_tensor(value.t, arr, dtype_id)
            self.g.node.insert(0, const)
            self.producer[name] = self.g.node[0]
        else:
            t = self.g.initializer.add()
            t.name = name
            self._store(t, arr, dtype_id)
            self.inits[name] = t
        return name

    def _store(self, t: onnx.TensorProto, arr: np.ndarray | Scaled, dtype_id: int) -> None:
        """Write a new value into initializer ``t``: a large one of the main graph into
        the payload store (the writer copies it to disk from there), else into ``t``."""
        main = self.outer is None and not self.function
        if self.payloads is not None and main and arr.nbytes >= INLINE_LIMIT:
            self.payloads.assign(t, arr, dtype_id)
        else:
            set_tensor(t, arr, dtype_id)

    def _exclusively_used(self, name: str, node: onnx.NodeProto, slot: int) -> bool:
        if name in self.input_names or name in self.output_names:
            return False
        cons = self.consumers.get(name, [])
        return len(cons) == 1 and cons[0] is node and list(node.input).count(name) == 1

    # ---- structural edits that keep the index exact (no reindex needed) ----------
    def _node_reads(self, node: onnx.NodeProto) -> set[str]:
        """Names ``node`` reads: its inputs and, for ops with subgraphs, their outer
        references (the same rule as :meth:`reindex`)."""
        names = {i for i in node.input if i}
        if node.op_type not in SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
            return names
        for sub in subgraphs(node):
            names |= outer_names_used(sub)
        return names

    def _unlink(self, node: onnx.NodeProto, names: Iterable[str]) -> None:
        for name in names:
            cons = self.consumers.get(name)
            if cons is None:
                continue
            cons[:] = [c for c in cons if c is not node]
            if not cons:
                del self.consumers[name]

    def _link(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            if o:
                self.producer[o] = node
        for name in sorted(self._node_reads(node)):
            cons = self.consumers.setdefault(name, [])
            if not any(c is node for c in cons):
                cons.append(node)

    def set_input(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        """``node.input[slot] = name`` (appending empty inputs up to ``slot``)."""
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        node.input[slot] = name
        if old and old not in self._node_reads(node):
            self._unlink(node, [old])
        if name:
            cons = self.consumers.setdefault(name, [])
            if not any(c is node for c in cons):
                cons.append(node)

    def set_output(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        """``node.output[slot] = name``."""
        old = node.output[slot]
        node.output[slot] = name
        if old and self.producer.get(old) is node:
            del self.producer[old]
        if name:
            self.producer[name] = node

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Remove ``node`` from the graph (identity comparison)."""
        for i, n in enumerate(self.g.node):
            if n is node:
                for o in node.output:
                    if o and self.producer.get(o) is node:
                        del self.producer[o]
                self._unlink(node, self._node_reads(node))
                del self.g.node[i]
                return
        raise ValueError("node not in graph")

    def index_matches(self) -> str | None:
        """None when the incrementally kept index equals a fresh one, else the difference
        (a self-check the tests switch on through ``fuse.CHECK_INDEX``)."""
        # node wrappers live only while referenced: keep the old maps alive while
        # rebuilding, so that "is" compares the same protobuf messages
        producer, consumers, inits = self.producer, self.consumers, set(self.inits)
        self.reindex()
        bad = [
            k
            for k in set(producer) | set(self.producer)
            if producer.get(k) is not self.producer.get(k)
        ]
        if bad:
            return f"producer index out of date for {sorted(bad)[:5]}"
        names = {k for k, v in consumers.items() if v} | {k for k, v in self.consumers.items() if v}
        for k in sorted(names):
            a, b = consumers.get(k, []), self.consumers.get(k, [])
            if len(a) != len(b) or any(not any(x is y for y in b) for x in a):
                return f"consumer index out of date for {k!r}"
        if inits != set(self.inits):
            return f"initializer index out of date for {sorted(inits ^ set(self.inits))[:5]}"
        return None

    def drop_value_info(self, names: Iterable[str]) -> None:
        """Forget shape annotations of tensors that no longer exist."""
        gone = set(names)
        keep = [v for v in self.g.value_info if v.name not in gone]
        if len(keep) != len(self.g.value_info):
            del self.g.value_info[:]
            self.g.value_info.extend(keep)

    def remove_unused_initializers(self, candidates: Iterable[str], reindex: bool = True) -> None:
        """Drop initializers and Constant nodes among ``candidates`` that nothing reads.

        ``reindex=False`` trusts the index as the edits kept it (the fold loop's own graph;
        after folds inside a subgraph the enclosing graphs' reads must be recounted)."""
        if reindex:
            self.reindex()
        cands = set(candidates)
        unused = {
            c
            for c in cands
            if not self.consumers.get(c)
            and c not in self.output_names
            and c not in self.input_names
        }
        dead = {c for c in unused if c in self.inits}
        dead_nodes = [
            n
            for n in self.g.node
            if n.op_type == "Constant" and len(n.output) == 1 and n.output[0] in unused
        ]
        if dead:  # delete in place: rebuilding the list would copy every tensor
            for i in reversed(range(len(self.g.initializer))):
                if self.g.initializer[i].name in dead:
                    del self.g.initializer[i]
            for name in dead:
                self.inits.pop(name, None)
                self._recent.pop(name, None)
        gone = [n.output[0] for n in dead_nodes]
        for n in dead_nodes:
            self.remove_node(n)
        if gone:
            self.drop_value_info(gone)

    def insert_after(self, anchor: onnx.NodeProto, new: onnx.NodeProto) -> onnx.NodeProto:
        """Insert a copy of ``new`` right after ``anchor``; return the stored node."""
        for i, n in enumerate(self.g.node):
            if n is anchor:
                self.g.node.insert(i + 1, new)
                stored = self.g.node[i + 1]
                self._link(stored)
                return stored
        raise ValueError("anchor not in graph")


_EXTERNAL = onnx.TensorProto.EXTERNAL


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    fast = raw_dtype(t.data_type)  # raw_data is little-endian on every platform (ONNX spec)
    if fast is not None and t.HasField("raw_data") and t.data_location != _EXTERNAL:
        # the common case, without numpy_helper's extra copy: a read-only view of the
        # payload (folds compute on float64 copies, never in place)
        raw = t.raw_data
        count = math.prod(t.dims)
        if len(raw) != count * fast.itemsize:
            raise MalformedNodeError(
                f"tensor {t.name!r} cannot be read ({len(raw)} bytes of data for "
                f"{count} {fast.name} values)"
            )
        return np.frombuffer(raw, dtype=fast).reshape(tuple(t.dims))
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:  # payload and dims disagree, unknown type, external data
        raise MalformedNodeError(f"tensor {t.name!r} cannot be read ({exc})") from None


_RANK_KEEPING = frozenset(
    {
        "BatchNormalization",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "Identity",
        "Neg",
        "Abs",
        "Elu",
        "Selu",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Erf",
        "Gelu",
        "PRelu",
        "Dropout",
    }
)


def set_tensor(t: onnx.TensorProto, arr: np.ndarray | Scaled, dtype_id: int) -> None:
    """Overwrite a tensor's data (and dims/type) with ``arr``, in place.

    Written as ``raw_data`` directly: going through ``numpy_helper.from_array`` and
    ``CopyFrom`` would keep the temporary tensor's memory alive with the model's.
    """
    for f in DATA_FIELDS:  # raw_data included: it is written below
        t.ClearField(f)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    t.data_type = dtype_id
    del t.dims[:]
    t.dims.extend(int(d) for d in arr.shape)
    t.raw_data = arr.tobytes()


def _value_attr(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and not a.ref_attr_name:
            return a
    return None


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node produces (``value``, ``value_float(s)``, ``value_int(s)``)."""
    a = _value_attr(node)
    if a is not None:
        return a.t
    for a in node.attribute:
        if a.ref_attr_name:
            continue
        if a.name == "value_float" and a.type == onnx.AttributeProto.FLOAT:
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats" and a.type == onnx.AttributeProto.FLOATS:
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
        if a.name == "value_int" and a.type == onnx.AttributeProto.INT:
            return numpy_helper.from_array(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints" and a.type == onnx.AttributeProto.INTS:
            return numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
    return None


class MalformedNodeError(ValueError):
    """A node the pass cannot read (wrong attribute type, inconsistent tensor, ...).

    Raised while *matching*; the driver turns it into a refusal for that normalization.
    """


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute value of a node, or ``default``.

    The stored value must have the type of ``default`` (a float default also accepts an
    int); otherwise, or for an attribute taken from a function's call site, raises
    :class:`MalformedNodeError`.
    """
    for a in node.attribute:
        if a.name != name:
            continue
        if a.ref_attr_name:
            raise MalformedNodeError(
                f"{_attr_where(node, name)} comes from the enclosing function's call site"
            )
        try:
            value = onnx.helper.get_attribute_value(a)
        except Exception:
            value = None
        ok = value is not None
        if ok and isinstance(default, bool | int) and not isinstance(default, float):
            ok = isinstance(value, int)
        elif ok and isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif ok and isinstance(default, bytes | str):
            ok = isinstance(value, bytes | str)
        elif ok and default is None and name in ("pads", "strides", "dilations", "kernel_shape"):
            ok = isinstance(value, list) and all(isinstance(v, int) for v in value)
        if not ok:
            try:
                kind = onnx.AttributeProto.AttributeType.Name(a.type)
            except ValueError:
                kind = str(a.type)
            raise MalformedNodeError(f"{_attr_where(node, name)} has an unexpected type ({kind})")
        return value
    return default


def _attr_where(node: onnx.NodeProto, name: str) -> str:
    return f"attribute {name!r} of {node.op_type} {node_label(node)!r}"


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (add or replace) an attribute."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
