"""Layouts and dtypes: channels_first, mixed precision, float16 overflow."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras
from keras import layers as L
from keras_helpers import assert_same_outputs, check_fused, fuse, randomize, run

pytestmark = pytest.mark.keras

CF = "channels_first"


def _walk(obj: Any) -> None:
    if isinstance(obj, dict):
        cfg = obj.get("config")
        if isinstance(cfg, dict):
            if cfg.get("data_format") == CF:
                cfg["data_format"] = "channels_last"
            if obj.get("class_name") == "BatchNormalization" and cfg.get("axis") == 1:
                cfg["axis"] = -1
            if obj.get("class_name") == "InputLayer":
                bs = cfg["batch_shape"]
                cfg["batch_shape"] = [bs[0], *bs[2:], bs[1]]
        obj.pop("build_config", None)
        for v in obj.values():
            _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v)


def channels_last_twin(model: keras.Model) -> keras.Model:
    """The same model with channels_last layers and the same weights.

    TF cannot run channels_first convolutions on the CPU, but Keras kernels have the same
    layout in both formats: running the twin on transposed inputs runs the real (fused)
    weights.
    """
    cfg = copy.deepcopy(model.get_config())
    _walk(cfg)
    twin = type(model).from_config(cfg)
    for layer in twin.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    return twin


CF_CASES: dict[
    str, tuple[Callable[[], list[Any]], tuple[int, ...], dict[str, tuple[str, str, str]]]
] = {
    "conv2d-backward": (
        lambda: [
            L.Conv2D(4, 3, groups=1, data_format=CF, name="lin"),
            L.BatchNormalization(axis=1, name="bn"),
        ],
        (3, 8, 8),
        {"bn": ("lin", "conv-bn", "backward")},
    ),
    "conv1d-groups-backward": (
        lambda: [
            L.Conv1D(4, 3, groups=2, data_format=CF, name="lin"),
            L.BatchNormalization(axis=1, name="bn"),
        ],
        (4, 9),
        {"bn": ("lin", "conv-bn", "backward")},
    ),
    "depthwise-backward": (
        lambda: [
            L.DepthwiseConv2D(3, depth_multiplier=2, data_format=CF, name="lin"),
            L.BatchNormalization(axis=1, name="bn"),
        ],
        (3, 8, 8),
        {"bn": ("lin", "depthwise-bn", "backward")},
    ),
    "separable-backward": (
        lambda: [
            L.SeparableConv2D(5, 3, data_format=CF, name="lin"),
            L.BatchNormalization(axis=1, name="bn"),
        ],
        (3, 8, 8),
        {"bn": ("lin", "separable-bn", "backward")},
    ),
    "transpose-backward": (
        lambda: [
            L.Conv2DTranspose(4, 3, strides=2, data_format=CF, name="lin"),
            L.BatchNormalization(axis=1, name="bn"),
        ],
        (3, 4, 4),
        {"bn": ("lin", "conv-transpose-bn", "backward")},
    ),
    "conv2d-forward": (
        lambda: [
            L.ReLU(name="r"),
            L.BatchNormalization(axis=1, name="bn"),
            L.Conv2D(4, 3, data_format=CF, name="lin"),
        ],
        (3, 8, 8),
        {"bn": ("lin", "bn-conv", "forward")},
    ),
    "separable-forward": (
        lambda: [
            L.ReLU(name="r"),
            L.BatchNormalization(axis=1, name="bn"),
            L.SeparableConv2D(4, 3, depth_multiplier=2, data_format=CF, name="lin"),
        ],
        (3, 8, 8),
        {"bn": ("lin", "bn-separable", "forward")},
    ),
}


@pytest.mark.parametrize("case_id", list(CF_CASES))
def test_channels_first(case_id: str) -> None:
    make_layers, shape, folds = CF_CASES[case_id]
    x = inp = keras.Input(shape, name="x")
    for layer in make_layers():
        x = layer(x)
    model = randomize(keras.Model(inp, x), seed=7)
    res = check_fused(model, folds=folds, compare=False)
    assert res.model.get_layer("lin").data_format == CF
    xcf = np.random.default_rng(2).normal(size=(2, *shape)).astype("float32")
    xcl = np.moveaxis(xcf, 1, -1)
    want = run(channels_last_twin(model), [xcl])[0]
    got = run(channels_last_twin(res.model), [xcl])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bn_flatten_channels_first_dense() -> None:
    # Flatten(channels_first) runs on the CPU: it transposes to channels_last first
    model = randomize(
        keras.Sequential(
            [
                keras.Input((3, 4, 5)),
                L.BatchNormalization(axis=1, name="bn"),
                L.Flatten(data_format=CF, name="flat"),
                L.Dense(6, name="lin"),
            ]
        ),
        seed=8,
    )
    check_fused(model, folds={"bn": ("lin", "bn-flatten-dense", "forward")})


def test_mixed_precision() -> None:
    mp = "mixed_float16"
    x = inp = keras.Input((8, 8, 3), name="x")
    x = L.Conv2D(4, 3, use_bias=False, dtype=mp, name="conv")(x)
    x = L.BatchNormalization(dtype=mp, name="bn1")(x)
    x = L.ReLU(dtype=mp, name="relu")(x)
    x = L.BatchNormalization(dtype=mp, name="bn2")(x)
    x = L.Flatten(dtype=mp, name="flat")(x)
    x = L.Dense(5, dtype=mp, name="dense")(x)
    model = randomize(keras.Model(inp, L.Activation("linear", dtype="float32", name="out")(x)))
    res = check_fused(
        model,
        folds={
            "bn1": ("conv", "conv-bn", "backward"),
            "bn2": ("dense", "bn-flatten-dense", "forward"),
        },
        compare=False,
    )
    for name in ("conv", "dense"):
        layer = res.model.get_layer(name)
        assert layer.dtype_policy.name == mp
        assert all(v.dtype == "float32" for v in layer.weights)
    # float16 compute: compare at float16 precision
    assert_same_outputs(
        model,
        res.model,
        [np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")],
        rtol=1e-2,
    )


def test_float16_overflow_is_refused() -> None:
    x = keras.Input((4,), name="x", dtype="float16")
    y = L.Dense(3, dtype="float16", name="lin")(x)
    model = keras.Model(x, L.BatchNormalization(dtype="float16", name="bn")(y))
    model.get_layer("lin").set_weights([np.full((4, 3), 100.0), np.zeros(3)])
    bn = model.get_layer("bn")
    bn.set_weights([np.full(3, 1000.0), np.zeros(3), np.zeros(3), np.full(3, 1e-6)])
    bn.epsilon = 0.0
    res = fuse(model)
    assert [(r.bn, r.reason) for r in res.refusals] == [
        ("bn", "folded values of 'lin' overflow float16 (fold refused)")  # as in ONNX
    ]
