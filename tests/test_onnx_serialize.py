"""bnfuse.onnx.storage.serialize writes models in pieces; the bytes must parse to the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_util import GraphBuilder

from bnfuse.onnx.storage import serialize


def _model(n_inits: int, size: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4)
    b.output(y)
    m = b.model()
    for i in range(n_inits):  # extra tensors of varied sizes (varint lengths of 1-3 bytes)
        arr = rng.standard_normal(size * (i + 1)).astype(np.float32)
        m.graph.initializer.append(numpy_helper.from_array(arr, f"extra{i}"))
    m.metadata_props.add(key="k", value="v")
    m.doc_string = "doc"
    m.functions.append(helper.make_function("dom", "f", ["a"], ["b"], [], []))
    return m


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 6), st.integers(1, 40_000), st.integers(0, 1000))
def test_pieces_parse_to_the_same_model(n_inits: int, size: int, seed: int) -> None:
    m = _model(n_inits, size, seed)
    data = serialize.to_bytes(m)
    back = onnx.ModelProto()
    back.ParseFromString(data)
    assert back == m
    assert back.SerializeToString() == m.SerializeToString()


def test_write_matches_serialize_to_string(tmp_path: Path) -> None:
    m = _model(3, 100_000, 1)
    path = tmp_path / "m.onnx"
    serialize.write(m, path)
    assert len(list(serialize.chunks(m))) > 1  # really written in pieces
    assert onnx.load(path) == m
    onnx.checker.check_model(onnx.load(path), full_check=True)


@pytest.mark.parametrize("where", ["model", "graph"])
def test_unknown_fields_fall_back_to_plain_serialization(where: str) -> None:
    m = _model(1, 10, 2)
    extra = b"\xf8\x07\x05"  # field 127, varint 5: unknown to the ONNX schema
    if where == "model":
        m.ParseFromString(m.SerializeToString() + extra)
    else:
        g = onnx.GraphProto()
        g.ParseFromString(m.graph.SerializeToString() + extra)
        m.graph.CopyFrom(g)
    parts = list(serialize.chunks(m))
    assert len(parts) == 1 and parts[0] == m.SerializeToString()
    assert parts[0].endswith(extra) or extra in parts[0]


def test_model_without_graph() -> None:
    m = onnx.ModelProto(ir_version=8)
    assert serialize.to_bytes(m) == m.SerializeToString()
