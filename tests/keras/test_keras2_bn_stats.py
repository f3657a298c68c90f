"""--check-stats / --recalibrate on Keras 2 (tf_keras) models, including a BN over
several axes (the per-pixel first layer of the BN notes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf_keras = pytest.importorskip("tf_keras")

import test_keras_bn_stats as _k3  # noqa: E402  (the Keras 3 twin's helpers)
from test_keras_bn_stats import data, exact_stats, stale  # noqa: E402
from test_keras_bn_stats import with_stats as set_stats  # noqa: E402

import bnfuse  # noqa: E402
from bnfuse.keras.stats import KerasCollector  # noqa: E402

EPS = 1e-3


def dense_net() -> Any:
    """The Keras 3 test's two-BN MLP, built with tf_keras."""
    return _k3.dense_net(K=tf_keras)


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
