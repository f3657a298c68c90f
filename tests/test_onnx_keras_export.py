"""Real Keras 3 exports (``model.export(path, format="onnx")``, i.e. tf2onnx): what they
contain for BatchNormalization after Dense, DepthwiseConv2D, Conv2DTranspose, and that
bnfuse folds all of it. BN statistics are randomized so every fold is non-trivial."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.keras

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

import bnfuse  # noqa: E402
from bnfuse.onnx.backend import OrtRunner  # noqa: E402
from bnfuse.onnx.count import count_affine_nodes  # noqa: E402

L = keras.layers


def randomize_bn(model: Any, seed: int = 0) -> None:
    r = np.random.default_rng(seed)
    for layer in model.layers:
        if not isinstance(layer, L.BatchNormalization):
            continue
        values = []
        for w in layer.weights:
            shape = tuple(w.shape)
            if "variance" in w.path:
                values.append(r.uniform(0.2, 3.0, shape))
            elif "gamma" in w.path:
                values.append(r.uniform(0.5, 2.0, shape) * r.choice([-1, 1], shape))
            else:  # beta, moving_mean
                values.append(r.normal(0, 1, shape))
        layer.set_weights([v.astype("float32") for v in values])


def mlp() -> Any:
    x = inp = keras.Input((12,))
    x = L.Dense(16)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Dense(8, use_bias=False)(x)
    x = L.BatchNormalization(center=False)(x)
    return keras.Model(inp, x)


def sequence() -> Any:
    x = inp = keras.Input((6, 5))
    x = L.Dense(8)(x)  # exported as Reshape -> MatMul -> Reshape
    x = L.BatchNormalization()(x)
    x = L.Dense(3, use_bias=False)(x)
    x = L.BatchNormalization(scale=False)(x)
    return keras.Model(inp, x)


def depthwise() -> Any:
    x = inp = keras.Input((10, 10, 4))
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.Conv2D(6, 1, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    # (Conv2D(groups=2) is not here: tf2onnx 1.17 leaves it as an unconverted
    # StatefulPartitionedCall node, which onnxruntime cannot load)
    return keras.Model(inp, x)


def transposed() -> Any:
    x = inp = keras.Input((6, 6, 4))
    x = L.Conv2DTranspose(5, 3, strides=2, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2DTranspose(3, 2, strides=2, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(4)(x)
    x = L.BatchNormalization()(x)
    return keras.Model(inp, x)


BUILDERS: dict[str, tuple[Callable[[], Any], int]] = {
    # name: (builder, BNs the export leaves unfolded). tf2onnx's own optimizer folds a
    # BN after a plain Conv2D into the Conv (depthwise: the second BN), but not after a
    # DepthwiseConv2D, a Conv2DTranspose or a Dense: those arrive as Mul -> Add.
    "mlp": (mlp, 2),
    "sequence": (sequence, 2),
    "depthwise": (depthwise, 1),
    "transposed": (transposed, 3),
}


def export(model: Any, path: Path) -> None:
    """Keras's own exporter. It refuses a functional model that was never called unless
    an input signature is given, so pass one (as bnfuse's Keras backend does)."""
    spec = [keras.InputSpec(shape=(None, *model.inputs[0].shape[1:]), dtype="float32")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False, input_signature=spec)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    build, bns = BUILDERS[name]
    keras.utils.set_random_seed(1)
    model = build()
    randomize_bn(model, seed=len(name))
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    export(model, path)
    return name, model, path, bns


def test_export_contains_bn_as_mul_add(exported) -> None:
    _name, _model, path, bns = exported
    m = onnx.load(str(path))
    counts = count_affine_nodes(m)
    # tf2onnx emits inference BN as Mul/Add by constants (or keeps BatchNormalization):
    # either way there is one BN-equivalent per Keras BN, not yet folded into the layers
    assert counts["BatchNormalization"] + counts["affine"] >= bns, counts
    ops = {n.op_type for n in m.graph.node}
    assert "BatchNormalization" in ops or "Mul" in ops


def test_bnfuse_folds_every_bn_of_the_export(exported, tmp_path: Path) -> None:
    _name, model, path, bns = exported
    out = tmp_path / "fused.onnx"
    res = bnfuse.fuse(path, out)
    assert res.validation is not None and res.validation.passed
    assert not res.refusals, res.refusals
    assert len(res.folds) == bns, [(f.kind, f.into) for f in res.folds]
    fused = onnx.load(str(out))
    assert count_affine_nodes(fused) == {"BatchNormalization": 0, "affine": 0}
    onnx.checker.check_model(fused, full_check=True)
    # the fused ONNX model computes what the Keras model computes
    runner = OrtRunner(fused)
    shape = [2, *[int(d) for d in model.inputs[0].shape[1:]]]
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    want = np.asarray(model(x, training=False))
    got = runner.run({runner.inputs[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_keras_exporter_needs_a_called_model_or_a_signature(tmp_path: Path) -> None:
    """What we found: Keras 3's ONNX export raises for a functional model that was never
    called when no input_signature is given; calling it once (or passing one) works."""
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not getattr(model, "_called", True):
            with pytest.raises(ValueError, match="never called"):
                model.export(str(tmp_path / "a.onnx"), format="onnx", verbose=False)
        model(np.zeros((1, 12), np.float32))
        model.export(str(tmp_path / "b.onnx"), format="onnx", verbose=False)
    assert os.path.getsize(tmp_path / "b.onnx") > 0
