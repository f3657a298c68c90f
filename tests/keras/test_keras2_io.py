"""Keras 2 (tf_keras) files: detection from the file, round trips in the same Keras and
format (.h5, Keras 2 .keras, SavedModel directory, .onnx), and bad input (one line, a
documented exit code, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

import h5py
import tf_keras
from keras_helpers import assert_same_outputs, bn_names, randomize
from typer.testing import CliRunner

import bnfuse
from bnfuse.cli import app
from bnfuse.errors import ModelLoadError
from bnfuse.keras.compat import flavor_of
from bnfuse.keras.detect import detect

pytestmark = pytest.mark.keras

L = tf_keras.layers
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def k2_model() -> Any:
    """The issue's Sequential: Conv(no bias) -> BN -> ReLU -> DepthwiseConv -> BN -> ReLU
    -> Dense (the DepthwiseConv2D that Keras 3 cannot deserialize from a Keras 2 file)."""
    return randomize(
        tf_keras.Sequential(
            [
                tf_keras.Input((8, 8, 3)),
                L.Conv2D(4, 3, use_bias=False, name="conv"),
                L.BatchNormalization(name="bn1"),
                L.ReLU(name="r1"),
                L.DepthwiseConv2D(3, name="dw"),
                L.BatchNormalization(name="bn2"),
                L.ReLU(name="r2"),
                L.Flatten(name="flat"),
                L.Dense(3, name="head"),
            ],
            name="k2",
        ),
        seed=5,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("k2files")
    m = k2_model()
    m.save(d / "m.h5")
    m.save(d / "m.keras")
    m.save(d / "sm", save_format="tf")
    return {"model": m, "h5": d / "m.h5", "keras": d / "m.keras", "savedmodel": d / "sm"}


def xs() -> list[np.ndarray]:
    return [np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")]


def test_detection_reads_the_file(files: dict[str, Any], tmp_path: Path) -> None:
    for fmt in ("h5", "keras", "savedmodel"):
        mf = detect(files[fmt])
        assert (mf.format, mf.version) == (fmt, 2)
    assert detect(files["h5"]).keras_version == tf_keras.__version__
    import keras

    k3 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for suffix in (".h5", ".keras"):
        k3.save(tmp_path / f"k3{suffix}")
        mf = detect(tmp_path / f"k3{suffix}")
        assert mf.version == 3 and mf.keras_version == keras.__version__


@pytest.mark.parametrize(
    ("src", "dst"),
    [("h5", "out.h5"), ("keras", "out.keras"), ("savedmodel", "out_dir"), ("h5", "out.keras")],
)
def test_round_trip_same_keras_and_format(
    files: dict[str, Any], tmp_path: Path, src: str, dst: str
) -> None:
    out = tmp_path / dst
    res = bnfuse.fuse(files[src], out, samples=2)
    assert [f.bn for f in res.folds] == ["bn1", "bn2"]
    assert res.validation is not None and res.validation.passed
    assert res.validation.runtime.startswith("Keras 2 (tf_keras ")
    assert res.written
    mf = detect(out)
    assert mf.version == 2
    assert mf.format == {"h5": "h5", "keras": "keras"}.get(out.suffix[1:], "savedmodel")
    back = tf_keras.models.load_model(str(out), compile=False)  # a TF 2.x deployment
    assert bn_names(back) == set()
    assert_same_outputs(files["model"], back, xs())
    # nothing else left beside the output (no temporary file or directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_savedmodel_output_replaces_a_savedmodel_dir_whole(
    files: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "deploy"
    shutil.copytree(files["savedmodel"], out)
    (out / "stale.txt").write_text("from the previous export")
    bnfuse.fuse(files["savedmodel"], out, samples=1)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]
    assert bn_names(tf_keras.models.load_model(str(out), compile=False)) == set()


def test_failed_directory_write_leaves_nothing(
    files: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnfuse.keras import keras2_io

    def boom(self: Any, *a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    model = bnfuse.fuse(files["h5"], validate=False).model
    monkeypatch.setattr(type(model), "save", boom)
    with pytest.raises(KeyboardInterrupt):
        keras2_io.save(model, tmp_path / "out_dir")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_of_a_keras2_model(files: dict[str, Any], tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "fused.onnx"
    res = bnfuse.fuse(files["h5"], out, samples=2)
    assert res.written
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    x = xs()[0]
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = files["model"](x, training=False).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_api_takes_and_returns_tf_keras_models(files: dict[str, Any]) -> None:
    m = files["model"]
    res = bnfuse.fuse(m, samples=2)
    assert isinstance(res.model, tf_keras.Model) and flavor_of(res.model).version == 2
    # trainable / non-trainable as tf.keras's model.summary() counts them
    assert res.before.trainable_params == int(sum(np.prod(w.shape) for w in m.trainable_weights))
    assert res.before.non_trainable_params == 16  # moving mean + variance of 2 BNs x 4
    assert res.after.non_trainable_params == 0


def test_cli_savedmodel_dir_in_and_out(files: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "fused_sm"
    r = runner.invoke(app, [str(files["savedmodel"]), "-o", str(out), "--samples", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert (out / "saved_model.pb").is_file() and (out / "keras_metadata.pb").is_file()
    report = json.loads(r.stdout)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert report["after"]["file_size"] == size  # a directory's size: all its files'
    assert report["before"]["file_size"] > 0


# --------------------------------------------------------------------------- bad input


def _plain_savedmodel(path: Path) -> None:
    import tensorflow as tf

    mod = tf.Module()
    mod.v = tf.Variable(1.0)
    mod.f = tf.function(lambda x: x * mod.v, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(mod, str(path))


def _bad(case: str, files: dict[str, Any], d: Path) -> Path:
    if case == "plain-savedmodel":
        _plain_savedmodel(d / "sm")
        return d / "sm"
    if case == "no-variables":
        shutil.copytree(files["savedmodel"], d / "sm")
        shutil.rmtree(d / "sm" / "variables")
        return d / "sm"
    if case == "truncated-h5":
        data = files["h5"].read_bytes()
        (d / "t.h5").write_bytes(data[: len(data) // 2])
        return d / "t.h5"
    if case == "plain-dir":
        (d / "notamodel").mkdir()
        return d / "notamodel"
    raise AssertionError(case)


def test_a_directory_that_is_not_a_savedmodel(files: dict[str, Any], tmp_path: Path) -> None:
    """On the command line a plain directory stands for the models inside it (none here:
    a usage error); through the API it is a model path, and not a SavedModel."""
    src = _bad("plain-dir", files, tmp_path)
    r = runner.invoke(app, [str(src), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"bnfuse: error: MODEL: {src}: no .onnx, .keras or .h5 files or SavedModel "
        "directories inside"
    ]
    with pytest.raises(ModelLoadError, match="not a SavedModel"):
        bnfuse.fuse(src)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("plain-savedmodel", "not a Keras model"),
        ("no-variables", "without its variables/ folder"),
        ("truncated-h5", "not a readable HDF5 model"),
    ],
)
def test_bad_keras2_input(files: dict[str, Any], tmp_path: Path, case: str, message: str) -> None:
    src = _bad(case, files, tmp_path)
    out = tmp_path / "out.h5"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = runner.invoke(app, [str(src), "-o", str(out)])
    assert r.exit_code == 3, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfuse: error: "), r.output
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def _lambda_model() -> Any:
    x = tf_keras.Input((4,), name="x")
    y = L.Lambda(lambda t: t * 2.0, name="double")(L.Dense(3, name="d")(x))
    return randomize(tf_keras.Model(x, L.BatchNormalization(name="bn")(y)))


@pytest.mark.parametrize("fmt", ["h5", "keras", "savedmodel"])
def test_lambda_refused_before_deserializing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    m = _lambda_model()
    path = tmp_path / {"h5": "lam.h5", "keras": "lam.keras", "savedmodel": "lam_sm"}[fmt]
    m.save(str(path), save_format={"h5": "h5", "keras": "keras", "savedmodel": "tf"}[fmt])

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("deserialized before the Lambda check")

    with monkeypatch.context() as mp:
        mp.setattr(tf_keras.models, "load_model", no_load)
        with pytest.raises(ModelLoadError) as err:
            bnfuse.fuse(path, tmp_path / "o.h5")
    msg = str(err.value)
    assert "Lambda" in msg and "'double'" in msg and "--unsafe-load" in msg
    assert not (tmp_path / "o.h5").exists()
    res = bnfuse.fuse(path, unsafe_load=True, samples=1)
    assert [r.bn for r in res.refusals] == ["bn"]


def test_keras2_file_without_tf_keras_exits_4(files: dict[str, Any], tmp_path: Path) -> None:
    """tf-keras missing: exit 4 naming the extra (a subprocess that cannot import it)."""
    code = (
        "import sys; sys.modules['tf_keras'] = None; "
        "from bnfuse.cli import main; sys.argv = ['bnfuse', sys.argv[1], '-o', sys.argv[2]]; "
        "main()"
    )
    out = tmp_path / "o.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for src in (files["h5"], files["savedmodel"]):
        p = subprocess.run(
            [sys.executable, "-c", code, str(src), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 4, p.stderr
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("bnfuse")]
        assert len(lines) == 1 and 'pip install "bnfuse[keras]"' in lines[0], p.stderr
        assert "tf-keras" in lines[0]
        assert not out.exists()


def test_h5_attrs_say_keras2(files: dict[str, Any]) -> None:
    with h5py.File(files["h5"], "r") as f:
        assert str(f.attrs["keras_version"]).startswith("2.")
