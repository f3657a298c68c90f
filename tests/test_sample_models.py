"""The shipped sample models (sample_models/, trained on scikit-learn's digits) fuse cleanly.

Every fused model must predict exactly the same class as the original for every held-out
test image, and still be accurate. The files are made by ``sample_models/make_samples.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfuse

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
DATA = SAMPLES / "digits_test.npz"
ONNX_MODELS = ("digits_cnn_bn.onnx", "digits_mlp.onnx", "digits_cnn.onnx")
KERAS_MODELS = ("digits_mlp.keras", "digits_cnn.keras")
SHIPPED = (*ONNX_MODELS, *KERAS_MODELS, "digits_test.npz")
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(DATA) as npz:
        return {k: npz[k] for k in npz.files}


def ort_classes(model: onnx.ModelProto | Path, data: dict[str, np.ndarray]) -> np.ndarray:
    """Predicted classes, onnxruntime with graph optimizations disabled (no implicit fusion)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in sess.get_inputs()}
    return np.asarray(sess.run(None, feeds)[0]).argmax(-1)


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def mul_add_affines(model: onnx.ModelProto) -> list[str]:
    """Mul by a constant then Add of a constant: how Keras/tf2onnx exports write a BN."""
    consts = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for n in model.graph.node:
        if n.op_type != "Mul" or not any(i in consts for i in n.input):
            continue
        after = consumers.get(n.output[0], [])
        if (
            len(after) == 1
            and after[0].op_type == "Add"
            and any(i in consts for i in after[0].input)
        ):
            found.append(n.name)
    return found


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_exists_and_is_small(name: str) -> None:
    path = SAMPLES / name
    assert path.is_file(), f"{path} missing: run `make samples`"
    assert path.stat().st_size < 1_000_000


def test_test_split_layouts_agree(data: dict[str, np.ndarray]) -> None:
    n = len(data["labels"])
    assert n == 450 and set(np.unique(data["labels"])) == set(range(10))
    assert data["pixels"].shape == (n, 8, 8) and data["pixels"].dtype == np.float32
    np.testing.assert_array_equal(data["image"], data["pixels"][..., None])
    np.testing.assert_array_equal(data["image_nchw"], data["pixels"][:, None])
    assert data["pixels"].min() == 0 and data["pixels"].max() == 16  # raw pixel counts


def test_cnn_bn_statistics_are_trained() -> None:
    model = onnx.load(str(SAMPLES / "digits_cnn_bn.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 4
    for bn in bns:
        mean, var = inits[bn.input[3]], inits[bn.input[4]]
        assert np.abs(mean).max() > 0.05, f"{bn.name}: running mean still at its initial 0"
        assert np.abs(var - 1).max() > 0.05, f"{bn.name}: running variance still at its initial 1"
        assert next(a.f for a in bn.attribute if a.name == "epsilon") == pytest.approx(1e-3)
    assert any(
        n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
        for n in model.graph.node
    )


@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_sample_fuses_without_changing_predictions(
    name: str, data: dict[str, np.ndarray]
) -> None:
    path = SAMPLES / name
    original = onnx.load(str(path))
    result = bnfuse.fuse(path, validate=True, inputs=DATA)
    fused = result.model

    n_bn = count_ops(original, "BatchNormalization")
    bn_results = [f for f in result.folds if f.kind == "BatchNormalization"]
    bn_results += [r for r in result.refusals if r.kind == "BatchNormalization"]
    assert len(bn_results) == n_bn, "every BatchNormalization is folded or refused"
    assert all(r.reason for r in result.refusals)
    left = count_ops(fused, "BatchNormalization")
    assert left == sum(r.kind == "BatchNormalization" for r in result.refusals)
    if result.folds:
        assert result.validation is not None and result.validation.passed

    before, after = ort_classes(path, data), ort_classes(fused, data)
    assert (before == after).all(), f"{int((before != after).sum())} predictions changed"
    assert np.mean(after == data["labels"]) >= MIN_ACCURACY


def test_cnn_bn_onnx_folds_every_batchnorm(data: dict[str, np.ndarray]) -> None:
    result = bnfuse.fuse(SAMPLES / "digits_cnn_bn.onnx", validate=True)  # random inputs
    assert count_ops(result.model, "BatchNormalization") == 0
    assert not result.refusals
    got = {f.bn: (f.direction, f.into, f.rule) for f in result.folds}
    assert got == {
        "bn_1": ("backward", "conv_1", "conv-bn"),
        "bn_2": ("backward", "gconv_2", "conv-bn"),  # grouped Conv, group=4
        "bn_3": ("forward", "fc_1", "bn-gemm"),  # MaxPool -> BN -> Flatten -> Gemm(transB=1)
        "bn_4": ("backward", "fc_1", "gemm-bn"),
    }
    assert result.validation is not None and result.validation.passed
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_array_equal(
        ort_classes(result.model, data), ort_classes(SAMPLES / "digits_cnn_bn.onnx", data)
    )


#: Keras's exporter (tf2onnx) writes each BN as Mul+Add: (affines, how many must fold).
#: digits_mlp.onnx's first-layer BN scales the last axis of the (N, 8, 8) input before a
#: Reshape to (N, 64): it folds forward through the Reshape into the first MatMul.
EXPORTED = {"digits_mlp.onnx": (4, 4), "digits_cnn.onnx": (3, 3)}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_keras_exported_bn_affines_are_folded_or_explained(
    name: str, data: dict[str, np.ndarray]
) -> None:
    path = SAMPLES / name
    n_affines, min_folded = EXPORTED[name]
    original = onnx.load(str(path))
    assert len(mul_add_affines(original)) == n_affines
    assert count_ops(original, "BatchNormalization") == 0
    result = bnfuse.fuse(path, validate=True, inputs=DATA)
    assert len(result.folds) + len(result.refusals) == n_affines, "each is folded or explained"
    assert len(result.folds) >= min_folded, result.refusals
    assert all(r.reason for r in result.refusals)
    assert len(mul_add_affines(result.model)) == len(result.refusals)
    assert result.validation is not None and result.validation.passed
    np.testing.assert_array_equal(ort_classes(result.model, data), ort_classes(path, data))


def _keras_backend() -> Any:
    pytest.importorskip("tensorflow")
    return pytest.importorskip("bnfuse.keras.backend")


KERAS_EXPECTED = {
    "digits_mlp.keras": {
        "bn_input": "forward",  # first layer, through Flatten into dense_1
        "bn_1": "backward",
        "bn_2": "backward",  # Dense without bias
        "bn_3": "forward",  # after Dense(relu), into the logits
    },
    "digits_cnn.keras": {
        "bn_1": "backward",  # Conv2D without bias
        "bn_2": "backward",  # DepthwiseConv2D, depth_multiplier=2
        "bn_3": "backward",  # SeparableConv2D (pointwise half)
        "bn_4": "forward",  # after ReLU, into the padding="valid" Conv2D
    },
}


@pytest.mark.keras
@pytest.mark.parametrize("name", KERAS_MODELS)
def test_keras_sample_fuses_without_changing_predictions(
    name: str, data: dict[str, np.ndarray]
) -> None:
    _keras_backend()
    import keras

    path = SAMPLES / name
    original = keras.saving.load_model(path)
    result = bnfuse.fuse(path, validate=True, inputs=DATA)
    assert result.validation is not None and result.validation.passed
    assert {f.bn: f.direction for f in result.folds} == KERAS_EXPECTED[name], result.refusals
    assert not result.refusals
    fused = result.model
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in fused.layers)

    x = data[original.inputs[0].name]
    before = np.asarray(original(x, training=False)).argmax(-1)
    after = np.asarray(fused(x, training=False)).argmax(-1)
    assert (before == after).all(), f"{int((before != after).sum())} predictions changed"
    assert np.mean(after == data["labels"]) >= MIN_ACCURACY


@pytest.mark.keras
def test_keras2_sample_per_pixel_bn(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    """digits_mlp_k2.h5 (tf_keras): the per-pixel first-layer BN (axis=[1, 2]) folds forward
    through Flatten, bn_1 backward; the output is a Keras 2 .h5 tf.keras loads and it
    predicts every test image as before."""
    _keras_backend()
    tf_keras = pytest.importorskip("tf_keras")
    path = SAMPLES / "digits_mlp_k2.h5"
    assert path.stat().st_size < 1_000_000
    out = tmp_path / "k2.fused.h5"
    result = bnfuse.fuse(path, out, inputs=DATA)
    assert result.validation is not None and result.validation.passed
    assert {f.bn: (f.direction, f.channels) for f in result.folds} == {
        "bn_pixels": ("forward", 64),
        "bn_1": ("backward", 64),
    }
    assert not result.refusals
    assert result.framework == f"Keras 2 (tf_keras {tf_keras.__version__})"
    original = tf_keras.models.load_model(str(path), compile=False)
    fused = tf_keras.models.load_model(str(out), compile=False)
    bn = original.get_layer("bn_pixels")
    assert list(bn.axis) == [1, 2] and float(np.ptp(bn.moving_mean.numpy())) > 1.0  # trained
    assert not any(isinstance(la, tf_keras.layers.BatchNormalization) for la in fused.layers)
    x = data["pixels"]
    before = np.asarray(original(x, training=False)).argmax(-1)
    after = np.asarray(fused(x, training=False)).argmax(-1)
    assert (before == after).all(), f"{int((before != after).sum())} predictions changed"
    assert np.mean(after == data["labels"]) >= MIN_ACCURACY
