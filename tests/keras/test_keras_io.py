"""Keras backend: files (.keras, .h5, .onnx), load errors, subclassed models, runner,
benchmark targets, stats and fuse options."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import h5py
import keras
from keras import layers as L
from keras_helpers import BACKEND, assert_same_outputs, bn_names, fuse, randomize, run

import bnfuse
from bnfuse.errors import ModelLoadError, UnsupportedModelError

pytestmark = pytest.mark.keras


def small_model() -> keras.Model:
    x = keras.Input((6, 6, 3), name="img")
    y = L.Conv2D(4, 3, use_bias=False, name="conv")(x)
    y = L.BatchNormalization(name="bn")(y)
    y = L.ReLU(name="relu")(y)
    y = L.Flatten(name="flat")(y)
    y = L.Dense(3, name="head")(y)
    return randomize(keras.Model(x, y, name="small"), seed=3)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return small_model()


@pytest.fixture(scope="module")
def fused(model: keras.Model) -> keras.Model:
    return fuse(model).model


def xs(shape: tuple[int, ...] = (2, 6, 6, 3)) -> list[np.ndarray]:
    return [np.random.default_rng(0).normal(size=shape).astype("float32")]


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_save_and_load_round_trip(
    tmp_path: Path, model: keras.Model, fused: keras.Model, suffix: str
) -> None:
    out = tmp_path / f"fused{suffix}"
    BACKEND.save(fused, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left
    back = BACKEND.load(out)
    assert bn_names(back) == set()
    assert [layer.name for layer in back.layers] == [layer.name for layer in fused.layers]
    assert_same_outputs(model, back, xs())
    st = BACKEND.stats(back, out)
    assert st.file_size == out.stat().st_size and st.bn_nodes == 0


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_fuse_file_through_public_api(tmp_path: Path, model: keras.Model, suffix: str) -> None:
    src = tmp_path / f"orig{suffix}"
    model.save(src)
    dst = tmp_path / f"out{suffix}"
    res = bnfuse.fuse(src, dst, samples=2)
    assert res.written and res.validation is not None and res.validation.passed
    assert [f.bn for f in res.folds] == ["bn"] and res.before.bn_nodes == 1
    assert res.before.file_size == src.stat().st_size
    assert_same_outputs(model, BACKEND.load(dst), xs())


def test_onnx_output(tmp_path: Path, model: keras.Model, fused: keras.Model) -> None:
    pytest.importorskip("tf2onnx")
    import onnx
    import onnxruntime as ort

    out = tmp_path / "fused.onnx"
    BACKEND.save(fused, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    proto = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = xs()[0]
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = run(model, [x])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    ("suffix", "onnx_backend"), [(".keras", True), (".h5", True), (".onnx", True), (".onnx", False)]
)
def test_outputs_get_the_permissions_of_a_new_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fused: keras.Model,
    suffix: str,
    onnx_backend: bool,
) -> None:
    """Written through temporary files, never left at mkstemp's 0o600 - the ONNX export
    included, with or without the ONNX backend's fold pass over it."""
    import os
    import stat

    if suffix == ".onnx":
        pytest.importorskip("tf2onnx")
    if not onnx_backend:
        import bnfuse.keras.onnx_export as onnx_export

        monkeypatch.setattr(onnx_export, "_onnx_backend", lambda: None)
    old = os.umask(0o027)
    try:
        out = tmp_path / f"fused{suffix}"
        BACKEND.save(fused, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    if not onnx_backend:
        assert any("without an ONNX fold pass" in n for n in BACKEND.save_notes)


def test_load_errors(tmp_path: Path, model: keras.Model) -> None:
    not_zip = tmp_path / "a.keras"
    not_zip.write_text("hello")
    empty_zip = tmp_path / "b.keras"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("readme.txt", "no model here")
    good_h5 = tmp_path / "good.h5"
    model.save(good_h5)
    truncated = tmp_path / "c.h5"
    truncated.write_bytes(good_h5.read_bytes()[:2000])
    cases = {
        not_zip: "not a .keras file (not a zip archive)",
        empty_zip: "zip archive without a Keras model",
        truncated: "not a readable HDF5 model",
        tmp_path / "missing.keras": "no such file",
    }
    for path, text in cases.items():
        with pytest.raises(ModelLoadError) as err:
            BACKEND.load(path)
        assert text in str(err.value) and "\n" not in str(err.value)


def test_lambda_needs_unsafe_load(tmp_path: Path) -> None:
    x = keras.Input((4,), name="x")
    y = L.Lambda(lambda t: t * 2.0, name="double")(L.Dense(3, name="d")(x))
    m = randomize(keras.Model(x, L.BatchNormalization(name="bn")(y)))
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"lam{suffix}"
        m.save(path)
        with pytest.raises(ModelLoadError) as err:
            BACKEND.load(path)
        msg = str(err.value)
        assert "Lambda" in msg and "'double'" in msg and "--unsafe-load" in msg
        with pytest.raises(ModelLoadError):
            bnfuse.fuse(path, validate=False)
        loaded = BACKEND.load(path, unsafe_load=True)
        res = bnfuse.fuse(path, unsafe_load=True, samples=2)
        assert [r.bn for r in res.refusals] == ["bn"]  # the Lambda sits between Dense and BN
        assert_same_outputs(m, loaded, [np.ones((2, 4), "float32")])


def test_unknown_custom_layer_names_the_class(tmp_path: Path, model: keras.Model) -> None:
    path = tmp_path / "custom.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    cfg = json.loads(files["config.json"])
    relu = next(c for c in cfg["config"]["layers"] if c["class_name"] == "ReLU")
    relu.update(module=None, class_name="MysteryLayer", registered_name="my_pkg>MysteryLayer")
    files["config.json"] = json.dumps(cfg).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
    with pytest.raises(ModelLoadError) as err:
        BACKEND.load(path)
    msg = str(err.value)
    assert "unknown layer class 'MysteryLayer' (registered as 'my_pkg>MysteryLayer')" in msg
    assert "\n" not in msg


def test_unknown_custom_layer_h5(tmp_path: Path, model: keras.Model) -> None:
    path = tmp_path / "custom.h5"
    model.save(path)
    with h5py.File(path, "r+") as f:
        text = f.attrs["model_config"]
        text = text.decode() if isinstance(text, bytes) else text
        f.attrs["model_config"] = text.replace('"ReLU"', '"MysteryLayer"')
    with pytest.raises(ModelLoadError) as err:
        BACKEND.load(path)
    assert "MysteryLayer" in str(err.value)


def test_multi_axis_bn_from_tf_keras_file(tmp_path: Path, model: keras.Model) -> None:
    path = tmp_path / "multi.h5"
    model.save(path)
    with h5py.File(path, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        bn = next(c for c in cfg["config"]["layers"] if c["class_name"] == "BatchNormalization")
        bn["config"]["axis"] = [1, 2]
        f.attrs["model_config"] = json.dumps(cfg)
    with pytest.raises(ModelLoadError) as err:
        BACKEND.load(path)
    assert "normalizes over several axes [1, 2]" in str(err.value)


class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="sub")
        self.dense = L.Dense(3)
        self.bn = L.BatchNormalization()

    def call(self, x):  # type: ignore[no-untyped-def]
        return self.bn(self.dense(x))


class Block(L.Layer):
    def __init__(self, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kw)
        self.conv = L.Conv2D(3, 1)
        self.bn = L.BatchNormalization(name="block_bn")

    def build(self, input_shape):  # type: ignore[no-untyped-def]
        self.conv.build(input_shape)
        self.bn.build((*input_shape[:-1], 3))

    def call(self, x):  # type: ignore[no-untyped-def]
        return self.bn(self.conv(x))


def test_subclassed_model_refused() -> None:
    m = Subclassed()
    m(np.zeros((1, 4), "float32"))
    with pytest.raises(UnsupportedModelError) as err:
        BACKEND.accept(m)
    assert "subclassed" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError):
        bnfuse.fuse(m)


def test_bn_inside_custom_layer_is_reported() -> None:
    x = keras.Input((5, 5, 2), name="x")
    y = Block(name="block")(x)
    y = L.BatchNormalization(name="bn")(L.Conv2D(3, 1, name="conv")(y))
    m = randomize(keras.Model(x, y))
    res = fuse(m)
    assert [(f.bn, f.into) for f in res.folds] == [("bn", "conv")]
    [ref] = res.refusals
    assert ref.bn == "block_bn" and ref.scope == "block"
    assert ref.reason == "inside layer 'block' (Block), whose internals bnfuse cannot rewrite"
    assert_same_outputs(m, res.model, [np.ones((2, 5, 5, 2), "float32")])


# --------------------------------------------------------------------------- options


def test_exclude_skip_and_forward_options(model: keras.Model) -> None:
    res = fuse(model, exclude=frozenset({"bn"}))
    assert [(r.bn, r.reason) for r in res.refusals] == [("bn", "excluded (rolled back)")]
    assert bn_names(res.model) == {"bn"}
    res = fuse(model, skip_rules=frozenset({"conv-bn"}))
    assert [(r.bn, r.reason, r.rule) for r in res.refusals] == [
        ("bn", "rule conv-bn is disabled", "conv-bn")
    ]
    first = randomize(
        keras.Sequential([keras.Input((5,)), L.BatchNormalization(name="bn"), L.Dense(2)])
    )
    res = fuse(first, forward=False)
    assert [(r.bn, r.reason) for r in res.refusals] == [("bn", "forward folding is disabled")]
    res = fuse(first, skip_rules=frozenset({"bn-dense"}))
    assert [r.reason for r in res.refusals] == ["rule bn-dense is disabled"]
    assert [f.rule for f in fuse(first).folds] == ["bn-dense"]


def test_rule_names() -> None:
    names = BACKEND.rule_names()
    assert names == (
        "dense-bn",
        "conv-bn",
        "depthwise-bn",
        "separable-bn",
        "conv-transpose-bn",
        "bn-dense",
        "bn-flatten-dense",
        "bn-conv",
        "bn-depthwise",
        "bn-separable",
        "bn-conv-transpose",
    )


# --------------------------------------------------------------------------- runtime


def two_io() -> keras.Model:
    a = keras.Input((6,), name="a")
    b = keras.Input((4, 2), name="b", dtype="float32")
    ya = L.BatchNormalization(name="bn_out")(L.Dense(5, name="dense_a")(a))
    yb = L.Flatten(name="fl")(L.Dense(3, name="dense_b")(b))
    out = L.Dense(2, name="head")(L.Concatenate(name="cat")([ya, yb]))
    return randomize(keras.Model([a, b], [out, ya], name="two"))


def test_runner_and_output_names() -> None:
    m = two_io()
    fused_m = fuse(m).model
    r0, r1 = BACKEND.runner(m), BACKEND.runner(fused_m)
    assert r0.runtime == "keras model(x, training=False)"  # type: ignore[attr-defined]
    assert [(s.name, s.dtype, s.shape) for s in r0.inputs] == [
        ("a", np.dtype("float32"), (None, 6)),
        ("b", np.dtype("float32"), (None, 4, 2)),
    ]
    # the BN output was a model output: an Identity keeps its name
    assert list(r0.output_names) == ["head", "bn_out"] == list(r1.output_names)
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.normal(size=(3, 6)).astype("float32"),
        "b": rng.normal(size=(3, 4, 2)).astype("float32"),
    }
    for o0, o1, ref in zip(
        r0.run(feeds), r1.run(feeds), run(m, [feeds["a"], feeds["b"]]), strict=True
    ):
        np.testing.assert_allclose(o0, ref)
        np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-5 * np.abs(o0).max())


def test_bench_targets(model: keras.Model) -> None:
    targets = BACKEND.bench_targets(model, threads=1)
    assert [t.runtime for t in targets] == ["keras tf.function", "keras eager"]
    feeds = {"img": xs()[0]}
    want = run(model, xs())[0]
    for t in targets:
        fn = t.prepare()
        for _ in range(2):  # the first call traces the tf.function
            [out] = fn(feeds)
            assert isinstance(out, np.ndarray)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        assert isinstance(t.note, str)


def test_stats_match_keras_counts() -> None:
    m = keras.Sequential([keras.Input((4,)), L.Dense(5), L.BatchNormalization()])
    st = BACKEND.stats(m)
    # model.summary(): Trainable params: 35 (kernel 20, bias 5, gamma 5, beta 5),
    # Non-trainable params: 10 (moving mean and variance)
    assert (st.trainable_params, st.non_trainable_params, st.params) == (35, 10, 45)
    assert (st.nodes, st.bn_nodes, st.file_size) == (2, 1, None)
    after = BACKEND.stats(fuse(randomize(m)).model)
    # the BN was the model output: an Identity of the same name now stands in its place
    assert (after.trainable_params, after.non_trainable_params, after.nodes, after.bn_nodes) == (
        25,
        0,
        2,
        0,
    )


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_round_trip_keeps_output_names_and_nested_models(tmp_path: Path, suffix: str) -> None:
    m = two_io()
    f = fuse(m).model  # its BN output is a model output: kept by an Identity
    out = tmp_path / f"two{suffix}"
    BACKEND.save(f, out)
    back = BACKEND.load(out)
    assert list(BACKEND.runner(back).output_names) == ["head", "bn_out"]
    rng = np.random.default_rng(1)
    feeds = [
        rng.normal(size=(2, 6)).astype("float32"),
        rng.normal(size=(2, 4, 2)).astype("float32"),
    ]
    assert_same_outputs(m, back, feeds)
