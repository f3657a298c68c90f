"""Real architectures from keras.applications (``weights=None``: nothing is downloaded),
small inputs, randomized BN statistics: every exactly foldable BN folds, outputs match."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras
from keras_helpers import BACKEND, assert_same_outputs, bn_names, fuse, randomize

import bnfuse

pytestmark = [pytest.mark.keras, pytest.mark.slow]

A = keras.applications

# name -> (builder, folds, refusals); DenseNet's pre-activation BNs (after a Concatenate
# or pooling, before a ReLU) and NASNet's BNs after a Concatenate have no linear neighbour.
APPS: dict[str, tuple[Callable[[], Any], int, int]] = {
    "MobileNetV2": (
        lambda: A.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10),
        52,
        0,
    ),
    "ResNet50": (lambda: A.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10), 53, 0),
    "EfficientNetB0": (
        lambda: A.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10),
        49,
        0,
    ),
    "Xception": (lambda: A.Xception(weights=None, input_shape=(71, 71, 3), classes=10), 40, 0),
    "DenseNet121": (
        lambda: A.DenseNet121(weights=None, input_shape=(64, 64, 3), classes=10),
        59,
        62,
    ),
    "NASNetMobile": (
        lambda: A.NASNetMobile(weights=None, input_shape=(96, 96, 3), classes=10),
        188,
        4,
    ),
}

LEGIT = re.compile(
    r"^no linear layer next to BN \(before: (Concatenate|MaxPooling2D|AveragePooling2D) '[^']+' "
    r"is not a linear layer; after: .+\)$"
)


@pytest.mark.parametrize("name", list(APPS))
def test_application(name: str) -> None:
    build, n_folds, n_refusals = APPS[name]
    keras.backend.clear_session()
    model = randomize(build(), seed=11, gentle=True)
    before = BACKEND.stats(model)
    from keras.src.utils.summary_utils import count_params  # what model.summary() prints

    assert before.trainable_params == count_params(model.trainable_weights)
    assert before.non_trainable_params == count_params(model.non_trainable_weights)

    res = fuse(model)
    assert len(res.folds) == n_folds, [r.reason for r in res.refusals][:5]
    assert len(res.refusals) == n_refusals
    for r in res.refusals:
        assert LEGIT.match(r.reason), r
    assert bn_names(res.model) == {r.bn for r in res.refusals}
    assert all(f.direction == "backward" for f in res.folds)
    x = np.random.default_rng(0).normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
    assert_same_outputs(model, res.model, [x], rtol=1e-4)

    after = BACKEND.stats(res.model)
    removed = sum(2 * f.channels for f in res.folds)  # moving mean and variance
    assert after.non_trainable_params == before.non_trainable_params - removed
    assert after.bn_nodes == n_refusals

    if name == "MobileNetV2":  # once through the public API (validation included)
        api = bnfuse.fuse(model, samples=1)
        assert api.validation is not None and api.validation.passed
        assert len(api.folds) == n_folds
