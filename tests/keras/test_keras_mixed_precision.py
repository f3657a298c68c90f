"""A ``mixed_float16`` Keras model (float16 layers, float32 output layer): the fold is
judged by float16's tolerance, since the original and the fused model both compute in
float16 (that a wrong fold still fails under float16's tolerance is checked on ONNX, in
tests/test_onnx_mixed_precision.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras
from keras import layers as L
from keras_helpers import randomize

import bnfuse
from bnfuse.keras.runtime import KerasRunner

pytestmark = [pytest.mark.keras, pytest.mark.slow]


@pytest.fixture
def mixed_model() -> Iterator[keras.Model]:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        x = keras.Input((16, 16, 3))
        h = L.Conv2D(8, 3, name="conv")(x)
        h = L.ReLU()(L.BatchNormalization(name="bn")(h))
        h = L.Dense(10)(L.Flatten()(h))
        y = L.Activation("linear", dtype="float32", name="out")(h)
        yield randomize(keras.Model(x, y))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_runner_compute_dtype(mixed_model: keras.Model) -> None:
    assert KerasRunner(mixed_model).compute_dtype == "float16"
    assert str(mixed_model.outputs[0].dtype).endswith("float32")


def test_mixed_float16_model_folds_and_validates(tmp_path: Path, mixed_model: keras.Model) -> None:
    src, dst = tmp_path / "m.keras", tmp_path / "f.keras"
    mixed_model.save(src)
    res = bnfuse.fuse(src, dst)  # failed before: float32 tolerance on float16 rounding
    assert [f.bn for f in res.folds] == ["bn"] and res.written
    assert res.validation is not None and res.validation.passed
    (o,) = res.validation.outputs
    assert o.dtype == "float32" and o.rtol == 1e-2
    fused = keras.saving.load_model(dst)
    x = np.random.default_rng(1).normal(0, 1, (2, 16, 16, 3)).astype(np.float32)
    a, b = (np.asarray(m(x, training=False), np.float64) for m in (mixed_model, fused))
    assert np.max(np.abs(a - b)) <= 1e-2 * np.max(np.abs(a))
