"""--check-stats / --recalibrate on Keras 2 (tf_keras) models, including a BN over
several axes (the per-pixel first layer of the BN notes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf_keras = pytest.importorskip("tf_keras")

import bnfuse  # noqa: E402
from bnfuse.keras.stats import KerasCollector  # noqa: E402

EPS = 1e-3


def dense_net() -> Any:
    """x (6) -> Dense 8 -> BN -> relu -> Dense 5 -> BN, built with tf_keras."""
    L = tf_keras.layers
    x = tf_keras.Input((6,), name="x")
    h = L.Dense(8, name="d1")(x)
    h = L.BatchNormalization(epsilon=EPS, name="bn1")(h)
    h = L.Activation("relu", name="relu")(h)
    h = L.Dense(5, name="d2")(h)
    y = L.BatchNormalization(epsilon=EPS, name="bn2")(h)
    model = tf_keras.Model(x, y)
    r = np.random.default_rng(0)
    for name in ("d1", "d2"):
        k, b = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([r.normal(0, 1, k.shape), r.normal(1, 1, b.shape)])
    for name in ("bn1", "bn2"):
        g, be, m, v = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights(
            [r.uniform(0.5, 2, g.shape), r.normal(0, 1, be.shape), m, v]
        )
    return model


def exact_stats(model: Any, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Population statistics of each BN's input, in numpy, upstream first."""
    k1, b1 = model.get_layer("d1").get_weights()
    g1, be1, _, _ = model.get_layer("bn1").get_weights()
    k2, b2 = model.get_layer("d2").get_weights()
    h1 = x.astype(np.float64) @ k1 + b1
    m1, v1 = h1.mean(0), h1.var(0)
    h2 = np.maximum(g1 * (h1 - m1) / np.sqrt(v1 + EPS) + be1, 0) @ k2 + b2
    return {"bn1": (m1, v1), "bn2": (h2.mean(0), h2.var(0))}


def set_stats(model: Any, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    for name, (m, v) in stats.items():
        g, be, _, _ = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([g, be, m.astype(np.float32), v.astype(np.float32)])
    return model


def stale(stats: dict[str, tuple[np.ndarray, np.ndarray]], steps: int = 5) -> dict[str, Any]:
    k = 1 - 0.99**steps  # a few momentum-0.99 updates from mean 0, variance 1
    return {n: (k * m, 1 - k + k * v) for n, (m, v) in stats.items()}


def data(n: int = 40) -> np.ndarray:
    return np.random.default_rng(1).normal(1.5, 2.0, (n, 6)).astype(np.float32)


def test_keras2_exact_statistics_ok_stale_flagged_and_recalibrated() -> None:
    x = data()
    exact = exact_stats(dense_net(), x)
    res = bnfuse.fuse(set_stats(dense_net(), exact), check_stats=True, inputs={"x": x})
    assert {s.bn: s.flag for s in res.bn_stats} == {"bn1": "ok", "bn2": "ok"}
    assert all(s.samples == 40 and s.mean_shift < 1e-4 for s in res.bn_stats)

    old = set_stats(dense_net(), stale(exact))
    res = bnfuse.fuse(old, check_stats=True, inputs={"x": x})
    assert [s.flag for s in res.bn_stats] == ["drift", "drift"]

    res = bnfuse.fuse(old, recalibrate=True, inputs={"x": x})
    assert isinstance(res.model, tf_keras.Model)
    want = np.asarray(set_stats(dense_net(), exact)(x, training=False))
    got = np.asarray(res.model(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert res.recalibration is not None and res.recalibration.waves == 2
    # the input model keeps its stale statistics
    np.testing.assert_array_equal(
        old.get_layer("bn1").get_weights()[2], stale(exact)["bn1"][0].astype(np.float32)
    )


def per_pixel_net() -> Any:
    """The notes' case: BatchNormalization(axis=[1, 2]) first on 8x8 images -> Flatten ->
    Dense."""
    L = tf_keras.layers
    x = tf_keras.Input((8, 8), name="img")
    h = L.BatchNormalization(axis=[1, 2], epsilon=EPS, name="bn")(x)
    y = L.Dense(3, name="fc")(L.Flatten(name="flat")(h))
    return tf_keras.Model(x, y)


def test_keras2_bn_over_several_axes_is_checked_per_element(tmp_path: Path) -> None:
    imgs = np.random.default_rng(2).uniform(0, 16, (50, 8, 8)).astype(np.float32)
    model = per_pixel_net()
    g, be, _, _ = model.get_layer("bn").get_weights()  # tf_keras keeps them as (1, 8, 8)
    mean, var = imgs.astype(np.float64).mean(0), imgs.astype(np.float64).var(0)
    mean, var = mean.reshape(g.shape), var.reshape(g.shape)
    model.get_layer("bn").set_weights([g, be, mean.astype(np.float32), var.astype(np.float32)])
    col = KerasCollector(model)
    assert [(s.name, s.keep, s.channels) for s in col.sites] == [("bn", (1, 2), 64)]
    res = bnfuse.fuse(model, check_stats=True, inputs={"img": imgs})
    [stat] = res.bn_stats
    assert stat.flag == "ok" and stat.channels == 64 and stat.samples == 50
    # one pixel's moving mean off by 3 standard deviations: drift, found per element
    model.get_layer("bn").set_weights(
        [g, be, mean + np.where(np.arange(64).reshape(g.shape) == 9, 3 * np.sqrt(var), 0), var]
    )
    [stat] = bnfuse.fuse(model, check_stats=True, inputs={"img": imgs}).bn_stats
    assert stat.flag == "drift" and stat.mean_shift == pytest.approx(3.0, rel=1e-3)
