"""A real Keras Conv1D model exported by Keras's own exporter (tf2onnx): its BNs arrive as
Mul -> Add after the Conv's Squeeze and before the next Unsqueeze, and all fold
(bnfuse/onnx/layout.py). Before layout ops were seen through, none was even listed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.keras

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

from test_onnx_keras_export import export, randomize_bn  # noqa: E402

import bnfuse  # noqa: E402
from bnfuse.onnx.backend import OrtRunner  # noqa: E402
from bnfuse.onnx.count import count_affine_nodes  # noqa: E402

L = keras.layers


def conv1d_net() -> Any:
    x = inp = keras.Input((16, 3))
    x = L.Conv1D(8, 3)(x)
    x = L.BatchNormalization()(x)  # backward, through the Squeeze
    x = L.ReLU()(x)
    x = L.BatchNormalization()(x)  # forward, through the Unsqueeze into a valid Conv1D
    x = L.Conv1D(6, 3, use_bias=False)(x)
    x = L.BatchNormalization(center=False)(x)  # still Mul -> Add (the mean shifts), backward
    return keras.Model(inp, x)


def test_keras_conv1d_export_folds_every_bn(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    model = conv1d_net()
    randomize_bn(model, seed=4)
    path = tmp_path / "conv1d.onnx"
    export(model, path)
    exported = onnx.load(str(path))
    assert count_affine_nodes(exported)["affine"] == 6  # three Mul -> Add pairs
    out = tmp_path / "fused.onnx"
    res = bnfuse.fuse(path, out)
    assert res.validation is not None and res.validation.passed
    assert not res.refusals, res.refusals
    assert sorted(f.rule for f in res.folds) == ["layout-bn", "layout-bn", "layout-forward"]
    fused = onnx.load(str(out))
    assert count_affine_nodes(fused) == {"BatchNormalization": 0, "affine": 0}
    runner = OrtRunner(fused)
    x = np.random.default_rng(3).normal(size=(2, 16, 3)).astype(np.float32)
    want = np.asarray(model(x, training=False))
    got = runner.run({runner.inputs[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
