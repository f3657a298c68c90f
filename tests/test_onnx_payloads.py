"""Weights kept outside the ModelProto: the wire-level loader (bnfuse.onnx.storage.wire), the
payload store (bnfuse.onnx.storage.payloads), lazy products (bnfuse.fold.Scaled) and the writer
that streams them (bnfuse.onnx.storage.serialize). Every path must give the same model, byte for
byte, as parsing and serializing it the ordinary way."""

from __future__ import annotations

import mmap
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_util import GraphBuilder, assert_close

import bnfuse
from bnfuse.fold import Scaled, _scaled
from bnfuse.onnx.backend import OnnxBackend, OnnxModel
from bnfuse.onnx.storage import external, serialize, wire
from bnfuse.onnx.storage import files as storage_files
from bnfuse.onnx.storage.payloads import LOCATION, Payloads, Span, is_placeholder

LIMIT = external.INLINE_LIMIT
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tensor(kind: str, size: int, r: np.random.Generator, name: str) -> TensorProto:
    if kind == "f32":
        return numpy_helper.from_array(r.normal(0, 1, size).astype(np.float32), name)
    if kind == "f16":
        return numpy_helper.from_array(r.normal(0, 1, size).astype(np.float16), name)
    if kind == "i64":
        return numpy_helper.from_array(r.integers(-9, 9, size).astype(np.int64), name)
    if kind == "u8":
        return numpy_helper.from_array(r.integers(0, 255, size).astype(np.uint8), name)
    if kind == "bf16":
        arr = r.normal(0, 1, size).astype(ml_dtypes.bfloat16)
        t = helper.make_tensor(name, TensorProto.BFLOAT16, [size], arr.tobytes(), raw=True)
        return t
    if kind == "typed":  # float_data, no raw_data: stays inline
        return helper.make_tensor(name, TensorProto.FLOAT, [size], r.normal(0, 1, size).tolist())
    if kind == "string":
        return helper.make_tensor(name, TensorProto.STRING, [2], [b"a", b"bc"])
    raise AssertionError(kind)


@st.composite
def models(draw: st.DrawFn) -> onnx.ModelProto:
    """A foldable CNN plus initializers of many kinds, sizes around the inline limit,
    tensor doc strings and metadata, model metadata and functions."""
    seed = draw(st.integers(0, 2**16))
    b = GraphBuilder(seed=seed)
    c = draw(st.sampled_from([2, 8, 24]))
    x = b.input("x", ["N", c, 6, 6])
    y = b.bn(b.conv(x, c, c, [3, 3], pads=[1, 1, 1, 1]), c)
    b.output(y)
    m = b.model()
    r = np.random.default_rng(seed)
    kinds = ["f32", "f16", "i64", "u8", "bf16", "typed", "string"]
    for i in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(kinds))
        size = draw(st.sampled_from([1, 200, 255, 256, 257, 600, 5000]))
        t = _tensor(kind, size, r, f"extra{i}")
        if draw(st.booleans()):
            t.doc_string = "doc"
        if draw(st.booleans()):
            t.metadata_props.add(key="k", value="v")
        m.graph.initializer.append(t)
    if draw(st.booleans()):
        m.metadata_props.add(key="m", value="v")
        m.doc_string = "model doc"
    return m


def _split(data: bytes) -> tuple[onnx.ModelProto, Payloads]:
    cut = wire.split(data, LOCATION, LIMIT)
    assert cut is not None
    skeleton, spans = cut
    return onnx.load_model_from_string(skeleton), Payloads(
        Span(data, a, b, (t0, t1)) for a, b, t0, t1 in spans
    )


@PROPS
@given(models())
def test_split_then_fill_gives_the_parsed_model_back(m: onnx.ModelProto) -> None:
    data = m.SerializeToString()
    # placeholders are exactly the main-graph tensors with a raw payload of LIMIT bytes
    expected = [t.name for t in m.graph.initializer if len(t.raw_data) >= LIMIT]
    if not expected:  # nothing to keep outside: the caller parses the bytes as they are
        assert wire.split(data, LOCATION, LIMIT) is None
        return
    skeleton, payloads = _split(data)
    assert [t.name for t in skeleton.graph.initializer if is_placeholder(t)] == expected
    assert len(skeleton.SerializeToString()) < len(data) or not expected
    # the writer streams the placeholders back: the same message (the model's fields in
    # the writer's order, the graph last), the same bytes once re-serialized
    written = onnx.load_model_from_string(serialize.to_bytes(skeleton, payloads))
    assert written == m and written.SerializeToString() == data
    payloads.materialize(skeleton.graph.initializer)
    assert skeleton == m


@PROPS
@given(models(), st.data())
def test_split_never_raises_on_damaged_bytes(m: onnx.ModelProto, data: st.DataObject) -> None:
    raw = bytearray(m.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        result = wire.split(candidate, LOCATION, LIMIT)  # a tuple or None, never an error
        assert result is None or isinstance(result[0], bytes)


def test_split_declines_what_protobuf_would_merge_or_cannot_hold() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", 16, 4, 4])
    b.output(b.bn(b.conv(x, 16, 16, [3, 3]), 16))
    data = b.model().SerializeToString()
    assert wire.split(data, LOCATION, LIMIT) is not None
    graph_field = onnx.ModelProto(graph=onnx.GraphProto(name="g2")).SerializeToString()
    assert wire.split(data + graph_field, LOCATION, LIMIT) is None  # two graph fields merge
    assert wire.split(data + b"\x0b", LOCATION, LIMIT) is None  # group wire type
    assert wire.split(data[:-3], LOCATION, LIMIT) is None  # truncated
    assert wire.split(b"", LOCATION, LIMIT) is None
    assert wire.split(data, LOCATION, 1 << 30) is None  # nothing large enough: nothing to do


def test_a_file_cannot_forge_a_placeholder() -> None:
    t = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "bnfuse-lazy:0000000000000000"), ("offset", "0")):
        e = t.external_data.add()
        e.key, e.value = key, value
    assert not is_placeholder(t) and external.is_external(t)
    assert LOCATION.startswith("bnfuse-lazy:") and t.external_data[0].value != LOCATION


def _placeholder(store: Payloads, arr: np.ndarray | Scaled, name: str = "w") -> TensorProto:
    t = TensorProto(name=name)
    store.assign(t, arr, helper.np_dtype_to_tensor_dtype(np.dtype(arr.dtype)))
    return t


def test_every_kind_of_entry_reads_writes_and_fills_the_same() -> None:
    r = np.random.default_rng(3)
    w = r.normal(0, 1, (300, 7)).astype(np.float32)
    factor = r.uniform(0.5, 2, (300, 1))
    expected = (w.astype(np.float64) * factor).astype(np.float32)
    data = b"xx" + w.tobytes() + b"yy"
    store = Payloads()
    span_t = numpy_helper.from_array(w, "span")
    span_t.ClearField("raw_data")
    store.mark(span_t, store.add(Span(data, 2, 2 + w.nbytes)))
    proto_t = TensorProto()
    proto_t.CopyFrom(span_t)
    store.mark(proto_t, store.add(numpy_helper.from_array(w, "span")))
    array_t = _placeholder(store, expected)
    scaled = Scaled(w, factor, np.dtype(np.float32))
    scaled_t = _placeholder(store, scaled)
    for t, value in ((span_t, w), (proto_t, w), (array_t, expected), (scaled_t, expected)):
        np.testing.assert_array_equal(store.array(t), value)
        assert store.nbytes(t) in (None, value.nbytes)
        found = store.pieces(t)
        assert found is not None
        size, pieces = found
        raw = b"".join(bytes(p) for p in pieces)
        assert size == len(raw) == value.nbytes and raw == value.tobytes()
        filled = TensorProto()
        filled.CopyFrom(t)
        store.fill(filled)
        assert not is_placeholder(filled)
        np.testing.assert_array_equal(numpy_helper.to_array(filled), value)


def test_a_branch_shares_entries_but_not_additions() -> None:
    base = Payloads([np.zeros(3, np.float32)])
    branch = base.branch()
    t = _placeholder(branch, np.ones(300, np.float32))
    assert len(base) == 1 and len(branch) == 2
    assert base.entry(t) is None  # the base store does not know the branch's new entry
    np.testing.assert_array_equal(branch.array(t), np.ones(300, np.float32))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([np.float16, np.float32, np.float64]),
    st.integers(1, 40),
    st.integers(1, 30),
    st.floats(-4, 4),
    st.integers(0, 2**16),
)
def test_lazy_product_equals_the_eager_one(
    dtype: type, rows: int, cols: int, log_scale: float, seed: int
) -> None:
    r = np.random.default_rng(seed)
    w = (r.normal(0, 1, (rows, cols)) * 10.0 ** r.uniform(-2, 4)).astype(dtype)
    factor = r.normal(0, 10.0**log_scale, (rows, 1))
    try:
        eager = _scaled(w, factor, np.dtype(dtype))
    except OverflowError:
        with pytest.raises(OverflowError):
            _scaled(w, factor, np.dtype(dtype), lazy=True)  # lazy never hides an overflow
        return
    lazy = _scaled(w, factor, np.dtype(dtype), lazy=True)
    np.testing.assert_array_equal(np.asarray(lazy), eager)
    if isinstance(lazy, Scaled):
        assert np.isfinite(eager).all()  # only products that cannot overflow are deferred
        blocks = b"".join(bytes(b.reshape(-1).view(np.uint8).data) for b in lazy.blocks())
        assert blocks == eager.tobytes()


def test_blocks_reuse_one_buffer_and_cover_the_product(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfuse.fold as fold

    monkeypatch.setattr(fold, "BLOCK_BYTES", 4096)
    r = np.random.default_rng(5)
    w = r.normal(0, 1, (100, 3, 3, 3)).astype(np.float32)
    s = Scaled(w, r.uniform(0.5, 2, (100, 1, 1, 1)), np.dtype(np.float32))
    full = np.asarray(s).tobytes()
    seen: list[int] = []
    copies: list[bytes] = []
    for b in s.blocks(reuse=True):
        seen.append(b.__array_interface__["data"][0])
        copies.append(b.tobytes())
    assert len(seen) >= 3 and len(set(seen)) == 1  # one buffer, overwritten block by block
    assert b"".join(copies) == full
    assert b"".join(b.tobytes() for b in s.blocks(reuse=False)) == full


def _big_model(seed: int = 0, c: int = 256) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", c, 4, 4])
    y = b.bn(b.conv(x, c, c, [3, 3], pads=[1, 1, 1, 1]), c)  # weight 2.4 MB
    y = b.node("Relu", [y])
    b.output(b.bn(b.conv(y, c, c, [1, 1]), c))
    return b.model()


@pytest.fixture(autouse=True)
def _split_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The models here are small: cut them all (as files from SPLIT_THRESHOLD on are)."""
    monkeypatch.setattr(storage_files, "SPLIT_THRESHOLD", 0)


def test_small_files_are_parsed_whole_and_fold_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_big_model(4, c=64), src)
    assert OnnxBackend().load(src).payloads is not None
    bnfuse.fuse(src, tmp_path / "split.onnx", validate=False)
    monkeypatch.setattr(storage_files, "SPLIT_THRESHOLD", src.stat().st_size + 1)
    assert OnnxBackend().load(src).payloads is None
    bnfuse.fuse(src, tmp_path / "whole.onnx", validate=False)
    assert (tmp_path / "split.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()


def test_large_file_is_mapped_and_folds_like_a_read_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _big_model()
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    before = src.read_bytes()
    be = OnnxBackend()
    loaded = be.load(src)
    assert isinstance(loaded, OnnxModel) and loaded.payloads is not None
    entries = [loaded.payloads.entry(t) for t in loaded.proto.graph.initializer]
    spans = [e for e in entries if isinstance(e, Span)]
    assert spans and all(isinstance(e.buf, mmap.mmap) for e in spans)
    res = bnfuse.fuse(src, tmp_path / "mapped.onnx")
    assert res.validation is not None and res.validation.passed and len(res.folds) == 2
    monkeypatch.setattr(storage_files, "MMAP_THRESHOLD", 1 << 40)  # read into bytes instead
    bnfuse.fuse(src, tmp_path / "read.onnx", validate=False)
    assert (tmp_path / "mapped.onnx").read_bytes() == (tmp_path / "read.onnx").read_bytes()
    assert src.read_bytes() == before
    assert_close(m, onnx.load(tmp_path / "mapped.onnx"))


def test_written_file_is_the_result_model(tmp_path: Path) -> None:
    m = _big_model(1, c=64)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    res = bnfuse.fuse(src, tmp_path / "f.onnx", validate=False)
    model = res.model
    assert isinstance(model, onnx.ModelProto)
    assert not any(is_placeholder(t) for t in external.iter_tensors(model))
    written = onnx.load(tmp_path / "f.onnx")
    assert written == model and written.SerializeToString() == model.SerializeToString()
    onnx.checker.check_model(model, full_check=True)


def test_result_model_is_made_on_first_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_big_model(2, c=64), src)
    calls: list[object] = []
    real = OnnxBackend.complete

    def spy(self: OnnxBackend, model: object) -> onnx.ModelProto:
        calls.append(model)
        return real(self, model)  # type: ignore[arg-type]

    monkeypatch.setattr(OnnxBackend, "complete", spy)
    res = bnfuse.fuse(src, tmp_path / "f.onnx")
    assert res.written and not calls  # writing never filled the weights into the proto
    first = res.model
    assert res.model is first and len(calls) == 1
    assert first == onnx.load(tmp_path / "f.onnx")


def test_bytes_split_cannot_read_are_parsed_the_ordinary_way(tmp_path: Path) -> None:
    m = _big_model(3, c=64)
    data = m.SerializeToString()
    merged = data + onnx.ModelProto(graph=onnx.GraphProto(doc_string="d")).SerializeToString()
    assert wire.split(merged, LOCATION, LIMIT) is None
    (tmp_path / "m.onnx").write_bytes(merged)
    loaded = OnnxBackend().load(tmp_path / "m.onnx")
    assert loaded.payloads is None and loaded.proto.graph.doc_string == "d"
    res = bnfuse.fuse(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert res.validation is not None and res.validation.passed and len(res.folds) == 2


def test_blocks_of_a_group_view_split_below_the_first_axis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A product computed in a group view [g, C/g, ...] (2 groups of 1.25 KB here)
    still comes in blocks of about BLOCK_BYTES, in C order, with the weight's shape."""
    import bnfuse.fold as fold

    monkeypatch.setattr(fold, "BLOCK_BYTES", 1024)
    r = np.random.default_rng(6)
    w = r.normal(0, 1, (10, 4, 4, 4)).astype(np.float32)
    factor = r.uniform(0.5, 2, (2, 1, 4, 1, 1))
    s = Scaled(w.reshape(2, 5, 4, 4, 4), factor, np.dtype(np.float32), shape=w.shape)
    expected = (w.reshape(2, 5, 4, 4, 4) * factor).astype(np.float32).reshape(w.shape)
    assert s.shape == w.shape and np.asarray(s).shape == w.shape
    np.testing.assert_array_equal(np.asarray(s), expected)
    sizes = [b.nbytes for b in s.blocks(reuse=True)]
    assert sizes == [1024, 256, 1024, 256]  # rows of 256 B, 4 at a time, group by group
    assert b"".join(b.tobytes() for b in s.blocks(reuse=False)) == expected.tobytes()
    with pytest.raises(ValueError, match="not a reshape"):
        Scaled(w, factor[0], np.dtype(np.float32), shape=(3, 3))


def test_fields_stop_at_the_end_of_a_sub_range() -> None:
    """Varints are read inline up to ``end``: a tag, length or value cut off by the end
    of the range is an error even where the buffer goes on."""
    body = wire.tag(1, 2) + wire.varint(3) + b"abc" + wire.tag(2, 0) + wire.varint(300)
    data = body + b"\x00" * 8
    assert [f[0] for f in wire.fields(data, 0, len(body))] == [1, 2]
    for end in (1, 2, len(body) - 1):
        with pytest.raises(wire.WireError):
            list(wire.fields(data, 0, end))
