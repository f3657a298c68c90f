"""tf.keras (Keras 2) applications saved as .h5 (``weights=None``: nothing is downloaded),
randomized BN statistics: every exactly foldable BN folds (the same counts as the Keras 3
twins in test_keras_applications.py), outputs match, and the written .h5 loads in tf_keras.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

import test_keras_applications as K3
import tf_keras
from keras_helpers import assert_same_outputs, bn_names, randomize

import bnfuse
from bnfuse.keras.detect import detect

pytestmark = [pytest.mark.keras, pytest.mark.slow]

A = tf_keras.applications

APPS: dict[str, Callable[[], Any]] = {
    "MobileNetV2": lambda: A.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10),
    "ResNet50": lambda: A.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10),
    "EfficientNetB0": lambda: A.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10),
    "DenseNet121": lambda: A.DenseNet121(weights=None, input_shape=(64, 64, 3), classes=10),
}


@pytest.mark.parametrize("name", list(APPS))
def test_keras2_application_h5(name: str, tmp_path: Path) -> None:
    _, n_folds, n_refusals = K3.APPS[name]  # the Keras 3 twin's counts
    tf_keras.backend.clear_session()
    model = randomize(APPS[name](), seed=11, gentle=True)
    src = tmp_path / f"{name}.h5"
    model.save(str(src), save_format="h5")
    assert detect(src).version == 2
    out = tmp_path / f"{name}.fused.h5"
    res = bnfuse.fuse(src, out, samples=1, rtol=1e-4, atol=1e-4)
    assert len(res.folds) == n_folds, [r.reason for r in res.refusals][:5]
    assert len(res.refusals) == n_refusals
    for r in res.refusals:
        assert K3.LEGIT.match(r.reason), r
    assert all(f.direction == "backward" for f in res.folds)
    assert res.validation is not None and res.validation.passed
    assert detect(out).version == 2
    back = tf_keras.models.load_model(str(out), compile=False)
    assert bn_names(back) == {r.bn for r in res.refusals}
    x = np.random.default_rng(0).normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
    assert_same_outputs(model, back, [x], rtol=1e-4)
