"""Models with external data: load (locations checked first), fold, save beside the output
(atomically), and the file-path code path used for models too large for one protobuf."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_util import GraphBuilder, assert_close, random_feeds

import bnfuse
from bnfuse.backend import FuseOptions
from bnfuse.errors import ModelLoadError, UnsupportedModelError, UsageError
from bnfuse.onnx import backend as onnx_backend
from bnfuse.onnx.backend import OnnxBackend, OrtRunner
from bnfuse.onnx.storage import external
from bnfuse.onnx.storage import files as storage_files


def small_model(seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 8, [3, 3]), 8, name="bn1")
    y = b.node("Relu", [y])
    y = b.node(
        "Mul",
        [b.conv(y, 8, 8, [3, 3], group=8), b.const(np.full((8, 1, 1), 1.5, np.float32))],
        name="mul",
    )
    y = b.node("Flatten", [y])
    y = b.node("MatMul", [y, b.weight([8 * 4 * 4, 10])])
    b.output(b.bn(y, 10, name="bn2"))
    return b.model()


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model converts the model it is given in place
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or f"{path.name}.data",
        size_threshold=0,
    )


def external_locations(path: Path) -> set[str]:
    header = onnx.load(str(path), load_external_data=False)
    return set(external.external_locations(header))


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("validate", [True, False])  # False: folded in place, no copy
def test_round_trip_with_external_data(tmp_path: Path, validate: bool) -> None:
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    m = small_model()
    save_external(m, src_dir / "m.onnx", "weights.bin")
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    res = bnfuse.fuse(src_dir / "m.onnx", out_dir / "fused.onnx", validate=validate)
    assert res.written
    if validate:
        assert res.validation is not None and res.validation.passed
    else:
        assert res.validation is None
    assert len(res.folds) == 3
    assert files(out_dir) == ["fused.onnx", "fused.onnx.data"]
    assert external_locations(out_dir / "fused.onnx") == {"fused.onnx.data"}  # relative
    assert (out_dir / "fused.onnx").stat().st_size < 4096  # the weights are not inline
    assert res.after.file_size == sum(p.stat().st_size for p in out_dir.iterdir())
    assert res.before.file_size == sum(p.stat().st_size for p in src_dir.iterdir())
    fused = onnx.load(str(out_dir / "fused.onnx"))
    onnx.checker.check_model(str(out_dir / "fused.onnx"), full_check=True)
    assert_close(m, fused)
    # onnxruntime reads it from the path (relative location resolved beside the model)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out_dir / "fused.onnx"), providers=["CPUExecutionProvider"])
    feeds = random_feeds(m)
    ref = OrtRunner(m).run(feeds)
    np.testing.assert_allclose(sess.run(None, feeds)[0], ref[0], rtol=1e-4, atol=1e-4)
    # the input is untouched
    assert files(src_dir) == ["m.onnx", "weights.bin"]
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before


def test_external_data_in_constants_and_subgraphs(tmp_path: Path) -> None:
    r = np.random.default_rng(0)
    big = onnx.numpy_helper.from_array(r.normal(size=(4, 300)).astype(np.float32), "cw")
    sub_w = onnx.numpy_helper.from_array(r.normal(size=(4, 300)).astype(np.float32), "sw")
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "sw"], ["a"], name="mm_then")],
        "then",
        [],
        [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["N", 300])],
        [sub_w],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["cw"], name="const", value=big),
            helper.make_node("MatMul", ["x", "cw"], ["b"], name="mm_else"),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["N", 300])],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "main",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 300])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    external.write_model(m, tmp_path / "c.onnx", tmp_path / "c.bin", "c.bin")
    header = onnx.load(str(tmp_path / "c.onnx"), load_external_data=False)
    assert external.external_locations(header) == ["c.bin"]
    assert (
        sum(t.data_location == onnx.TensorProto.EXTERNAL for t in external.iter_tensors(header))
        == 2
    )
    be = OnnxBackend()
    loaded = be.complete(be.load(tmp_path / "c.onnx"))
    assert not external.uses_external_data(loaded)
    assert loaded == m


def test_missing_data_file(tmp_path: Path) -> None:
    save_external(small_model(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelLoadError) as err:
        bnfuse.fuse(tmp_path / "m.onnx", tmp_path / "f.onnx")
    msg = str(err.value)
    assert "external data file 'm.onnx.data'" in msg and "is missing" in msg
    assert "\n" not in msg
    assert files(tmp_path) == ["m.onnx"]


def test_truncated_data_file(tmp_path: Path) -> None:
    save_external(small_model(), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="is truncated"):
        OnnxBackend().load(tmp_path / "m.onnx")


def _point_outside(model_path: Path, location: str) -> None:
    header = onnx.load(str(model_path), load_external_data=False)
    for tensor in external.iter_tensors(header):
        for e in tensor.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(header, str(model_path))


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink", "nested-dotdot"])
def test_location_escaping_the_model_directory_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    save_external(small_model(), model_dir / "m.onnx")
    secret = tmp_path / "secret.data"
    os.replace(model_dir / "m.onnx.data", secret)  # a real file, so only the check stops it
    location = {
        "dotdot": "../secret.data",
        "absolute": str(secret),
        "symlink": "link.data",
        "nested-dotdot": "sub/../../secret.data",
    }[where]
    if where == "symlink":
        (model_dir / "link.data").symlink_to(secret)
    _point_outside(model_dir / "m.onnx", location)

    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.path.realpath(file) if isinstance(file, str | Path) else str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    with pytest.raises(ModelLoadError, match="outside the model's directory"):
        OnnxBackend().load(model_dir / "m.onnx")
    assert str(secret) not in opened


def test_in_memory_model_with_unloaded_external_data(tmp_path: Path) -> None:
    save_external(small_model(), tmp_path / "m.onnx")
    header = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(UnsupportedModelError, match="external data"):
        bnfuse.fuse(header)


def test_output_must_not_overwrite_the_inputs_data(tmp_path: Path) -> None:
    save_external(small_model(), tmp_path / "m.onnx", "f.onnx.data")
    with pytest.raises(UsageError, match="would overwrite the external data"):
        bnfuse.fuse(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert files(tmp_path) == ["f.onnx.data", "m.onnx"]


def test_failed_write_leaves_nothing_and_keeps_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_external(small_model(), tmp_path / "m.onnx")
    (tmp_path / "f.onnx").write_bytes(b"old")
    real = external.write_model

    def broken(model, path, data_path, location, **kw):  # type: ignore[no-untyped-def]
        real(model, path, data_path, location, **kw)
        raise KeyboardInterrupt  # interrupted after both files were written

    monkeypatch.setattr(external, "write_model", broken)
    with pytest.raises(KeyboardInterrupt):
        bnfuse.fuse(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert files(tmp_path) == ["f.onnx", "m.onnx", "m.onnx.data"]
    assert (tmp_path / "f.onnx").read_bytes() == b"old"


def test_large_model_path_with_a_lowered_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The > 2 GB code path, exercised on a small model: external data on save, and
    onnxruntime sessions created from a file path instead of serialized bytes."""
    monkeypatch.setattr(storage_files, "FILE_PATH_THRESHOLD", 1)
    m = small_model(seed=4)
    onnx.save_model(m, str(tmp_path / "plain.onnx"))  # no external data in the input
    made: list[object] = []
    real_session = onnx_backend.session_source

    def spy(model):  # type: ignore[no-untyped-def]
        data, tmp = real_session(model)
        made.append(data)
        return data, tmp

    monkeypatch.setattr(onnx_backend, "session_source", spy)
    res = bnfuse.fuse(tmp_path / "plain.onnx", tmp_path / "f.onnx", bench=True, bench_seconds=0.2)
    assert res.validation is not None and res.validation.passed
    assert res.bench is not None and res.bench.rows
    assert made and all(isinstance(d, str) for d in made)  # paths, never bytes
    assert files(tmp_path) == ["f.onnx", "f.onnx.data", "plain.onnx"]
    assert external_locations(tmp_path / "f.onnx") == {"f.onnx.data"}
    assert_close(m, onnx.load(str(tmp_path / "f.onnx")))
    # temporary model files for onnxruntime are gone once their users are
    del res
    import gc

    gc.collect()
    assert not [d for d in made if isinstance(d, str) and os.path.exists(d) and "bnfuse-ort-" in d]


def test_loaded_external_model_runs_from_its_own_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_files, "FILE_PATH_THRESHOLD", 1)
    save_external(small_model(), tmp_path / "m.onnx")
    be = OnnxBackend()
    model = be.load(tmp_path / "m.onnx")
    runner = be.runner(model)
    assert runner.loaded_from_path
    fused = be.fuse(model, FuseOptions()).model
    assert be.runner(fused).loaded_from_path
    feeds = random_feeds(model.proto)
    a, b = runner.run(feeds), be.runner(fused).run(feeds)
    np.testing.assert_allclose(b[0], a[0], rtol=1e-4, atol=1e-4)


def test_write_model_does_not_modify_the_model(tmp_path: Path) -> None:
    m = small_model()
    before = m.SerializeToString()
    external.write_model(m, tmp_path / "a.onnx", tmp_path / "a.bin", "a.bin")
    assert m.SerializeToString() == before
    be = OnnxBackend()
    loaded = be.complete(be.load(tmp_path / "a.onnx"))
    assert loaded.graph == m.graph


def test_skeleton_keeps_structure_without_payloads() -> None:
    m = small_model()
    sk = external.skeleton(m)
    assert [n.name for n in sk.graph.node] == [n.name for n in m.graph.node]
    big = [t for t in sk.graph.initializer if external.payload_bytes(t) >= external.INLINE_LIMIT]
    assert big and all(not t.raw_data for t in big)
    assert [list(t.dims) for t in sk.graph.initializer] == [
        list(t.dims) for t in m.graph.initializer
    ]
    assert helper.printable_graph(sk.graph) == helper.printable_graph(m.graph)


# ---- damaged files -------------------------------------------------------------------


def test_tensor_data_not_matching_its_shape(tmp_path: Path) -> None:
    m = small_model()
    bias = next(t for t in m.graph.initializer if t.name.startswith("b"))
    bias.raw_data = bias.raw_data[:-4]
    onnx.save_model(m, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelLoadError, match=r"damaged ONNX model \(tensor .* holds"):
        OnnxBackend().load(tmp_path / "m.onnx")


def test_name_that_is_not_utf8(tmp_path: Path) -> None:
    raw = small_model().SerializeToString()
    name = b"bn1_out"
    assert raw.count(name) >= 2
    (tmp_path / "m.onnx").write_bytes(raw.replace(name, b"\xe2n1_out"))
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        OnnxBackend().load(tmp_path / "m.onnx")


def test_attribute_of_the_wrong_type_is_a_refusal() -> None:
    m = small_model()
    bn = next(n for n in m.graph.node if n.name == "bn1")
    del bn.attribute[:]
    bn.attribute.append(helper.make_attribute("epsilon", "large"))
    res = OnnxBackend().fuse(m, FuseOptions())
    reasons = {r.bn: r.reason for r in res.refusals}
    assert "malformed node: attribute 'epsilon' of BatchNormalization 'bn1'" in reasons["bn1"]
    assert "unexpected type (STRING)" in reasons["bn1"]
    assert {f.bn for f in res.folds} == {"mul", "bn2"}


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_fold_holds_about_one_extra_copy_of_the_weights(tmp_path: Path) -> None:
    """The fused copy shares no memory with the original but duplicates each weight only
    once, folded or not (a full copy followed by rewriting the folded weights, or
    rebuilding the initializer list, would hold several)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from onnx_util import GraphBuilder
        from bnfuse.backend import FuseOptions
        from bnfuse.onnx.backend import OnnxBackend

        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096

        b = GraphBuilder(seed=0)
        y = b.input("x", ["N", 1024])
        for _ in range(12):  # 12 x 4 MiB weights, each followed by a BN
            y = b.bn(b.node("MatMul", [y, b.const(np.full((1024, 1024), 0.01, np.float32))]), 1024)
        b.output(y)
        m = b.model()  # (b stays alive: memory it frees would be reused and hide growth)
        before = rss()
        res = OnnxBackend().fuse(m, FuseOptions())
        assert len(res.folds) == 12
        print((rss() - before) / (12 * 4 * 2**20))
        """
    )
    # large blocks straight from mmap, so that freed memory leaves the RSS at once
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1.6


def test_external_weights_are_mapped_not_read(tmp_path: Path) -> None:
    # main-graph weights in a data file become placeholders for spans of a read-only
    # memory map of it: nothing is copied at load, folds read views, the writer streams
    import mmap

    from bnfuse.onnx.storage.payloads import Span, is_placeholder

    m = small_model(seed=7)
    save_external(m, tmp_path / "m.onnx")
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    be = OnnxBackend()
    loaded = be.load(tmp_path / "m.onnx")
    assert loaded.payloads is not None
    inits = list(loaded.proto.graph.initializer)
    assert inits and all(is_placeholder(t) for t in inits)
    entries = [loaded.payloads.entry(t) for t in inits]
    assert all(isinstance(e, Span) and isinstance(e.buf, mmap.mmap) for e in entries)
    res = bnfuse.fuse(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert res.validation is not None and res.validation.passed and len(res.folds) == 3
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before
    assert external_locations(tmp_path / "f.onnx") == {"f.onnx.data"}
    assert_close(m, onnx.load(str(tmp_path / "f.onnx")))
    assert be.complete(loaded) == m  # filled from the map: the original model


def test_external_weight_of_the_wrong_length_is_rejected(tmp_path: Path) -> None:
    m = small_model(seed=8)
    save_external(m, tmp_path / "m.onnx")
    header = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    w = next(t for t in header.graph.initializer if len(t.dims) == 4)
    for e in w.external_data:
        if e.key == "length":
            e.value = str(int(e.value) - 4)
    onnx.save(header, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelLoadError, match=rf"damaged ONNX model \(tensor '{w.name}' holds"):
        OnnxBackend().load(tmp_path / "m.onnx")
