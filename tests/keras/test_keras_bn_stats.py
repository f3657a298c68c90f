"""--check-stats / --recalibrate on Keras 3 models whose BN statistics are set from data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import bnfuse
from bnfuse.cli import app
from bnfuse.keras.stats import KerasCollector

EPS = 1e-3


def dense_net(sequential: bool = False, K: Any = keras) -> Any:
    """x (6) -> Dense 8 -> BN -> relu -> Dense 5 -> BN -> y, random kernels and γ/β,
    built with the Keras module ``K`` (``keras``, or ``tf_keras`` for Keras 2)."""
    layers = [
        K.layers.Dense(8, name="d1"),
        K.layers.BatchNormalization(epsilon=EPS, name="bn1"),
        K.layers.Activation("relu", name="relu"),
        K.layers.Dense(5, name="d2"),
        K.layers.BatchNormalization(epsilon=EPS, name="bn2"),
    ]
    if sequential:
        model = K.Sequential([K.Input((6,), name="x"), *layers])
    else:
        x = K.Input((6,), name="x")
        y = x
        for la in layers:
            y = la(y)
        model = K.Model(x, y)
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


def data(n: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.5, 2.0, (n, 6)).astype(np.float32)


def exact_stats(model: Any, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Population statistics of each BN's input, computed in numpy, upstream first."""
    k1, b1 = model.get_layer("d1").get_weights()
    g1, be1, _, _ = model.get_layer("bn1").get_weights()
    k2, b2 = model.get_layer("d2").get_weights()
    h1 = x.astype(np.float64) @ k1 + b1
    m1, v1 = h1.mean(0), h1.var(0)
    n1 = g1 * (h1 - m1) / np.sqrt(v1 + EPS) + be1
    h2 = np.maximum(n1, 0) @ k2 + b2
    return {"bn1": (m1, v1), "bn2": (h2.mean(0), h2.var(0))}


def with_stats(model: Any, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    for name, (m, v) in stats.items():
        layer = model.get_layer(name)
        g, be, _, _ = layer.get_weights()
        layer.set_weights([g, be, m.astype(np.float32), v.astype(np.float32)])
    return model


def stale(stats: dict[str, tuple[np.ndarray, np.ndarray]], steps: int = 5) -> dict[str, Any]:
    k = 1 - 0.99**steps  # a few momentum-0.99 updates from mean 0, variance 1
    return {n: (k * m, 1 - k + k * v) for n, (m, v) in stats.items()}


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


@pytest.mark.parametrize("sequential", [False, True])
def test_exact_statistics_ok_stale_flagged(sequential: bool) -> None:
    x = data()
    model = dense_net(sequential)
    exact = exact_stats(model, x)
    res = bnfuse.fuse(with_stats(model, exact), check_stats=True, inputs={"x": x})
    assert {s.bn: s.flag for s in res.bn_stats} == {"bn1": "ok", "bn2": "ok"}
    assert all(s.samples == 40 and s.mean_shift < 1e-4 for s in res.bn_stats)
    assert all(f.widening is not None for f in res.folds)
    res = bnfuse.fuse(
        with_stats(dense_net(sequential), stale(exact)), check_stats=True, inputs={"x": x}
    )
    assert [s.flag for s in res.bn_stats] == ["drift", "drift"]


def test_never_updated_bn_flagged_with_and_without_data() -> None:
    x = data()
    model = dense_net()
    with_stats(model, {"bn1": exact_stats(model, x)["bn1"]})
    bn2 = model.get_layer("bn2")  # untouched statistics; γ/β back to their initial values
    g, be, m, v = bn2.get_weights()
    bn2.set_weights([np.ones_like(g), np.zeros_like(be), m, v])
    for inputs in (None, {"x": x}):
        stats = {s.bn: s for s in bnfuse.fuse(model, check_stats=True, inputs=inputs).bn_stats}
        assert stats["bn2"].flag == "default" and stats["bn1"].flag == "ok"


def test_recalibrate_gives_the_exactly_set_model(tmp_path: Path) -> None:
    x = data()
    reference = dense_net()
    exact = exact_stats(reference, x)
    with_stats(reference, exact)
    model = with_stats(dense_net(), stale(exact))
    before = [w.copy() for w in model.get_weights()]
    res = bnfuse.fuse(model, recalibrate=True, inputs={"x": x})
    for a, b in zip(before, model.get_weights(), strict=True):  # the input model untouched
        np.testing.assert_array_equal(a, b)
    want = predict(reference, x)
    got = predict(res.model, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert len(res.folds) == 2 and res.validation is not None and res.validation.passed
    rec = res.recalibration
    assert rec is not None and rec.bns == ("bn1", "bn2") and rec.waves == 2
    assert rec.outputs[0].max_abs > 0.1 and rec.outputs[0].top1_agreement is not None


def test_collector_streams_over_batches_and_orders_waves() -> None:
    x = data()
    model = dense_net()
    col = KerasCollector(model)
    assert [(s.name, s.depth, s.keep) for s in col.sites] == [("bn1", 1, (-1,)), ("bn2", 2, (-1,))]
    one = col.collect(model, ["bn1", "bn2"], [{"x": x}])
    many = col.collect(model, ["bn1", "bn2"], [{"x": x[:3]}, {"x": x[3:4]}, {"x": x[4:]}])
    for name in ("bn1", "bn2"):
        assert many[name].count == one[name].count == 40
        np.testing.assert_allclose(many[name].mean, one[name].mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(many[name].var, one[name].var, rtol=1e-9)
    np.testing.assert_allclose(one["bn1"].var, exact_stats(model, x)["bn1"][1], rtol=1e-4)


def conv_net() -> Any:
    x = keras.Input((5, 5, 3), name="img")
    y = keras.layers.Conv2D(4, 1, name="conv")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    return keras.Model(x, keras.layers.GlobalAveragePooling2D()(y))


def test_channels_last_conv_and_cli(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(2, 3, (7, 5, 5, 3)).astype(np.float32)
    model = conv_net()
    k, b = model.get_layer("conv").get_weights()
    h = np.einsum("nhwc,co->nhwo", x.astype(np.float64), k[0, 0]) + b
    bn = model.get_layer("bn")
    g, be, _, _ = bn.get_weights()
    bn.set_weights([g, be, h.mean((0, 1, 2)), h.var((0, 1, 2))])
    src = tmp_path / "m.keras"
    model.save(src)
    np.savez(tmp_path / "x.npz", img=x)
    res = bnfuse.fuse(src, check_stats=True, inputs=tmp_path / "x.npz")
    assert res.bn_stats[0].flag == "ok" and res.bn_stats[0].samples == 7 * 25
    bn.set_weights([g, be, np.zeros(4), np.ones(4)])  # never updated
    model.save(src)
    out = tmp_path / "o.keras"
    r = CliRunner().invoke(
        app, [str(src), "-o", str(out), "--recalibrate", "--inputs", str(tmp_path / "x.npz")]
    )
    assert r.exit_code == 0, r.output
    assert "Recalibration: 1 BN(s)" in r.output and "default" in r.output
    fused = keras.models.load_model(out)
    want = h.mean((1, 2))  # recalibrated BN: (h - mean) / sqrt(var + eps) * g + be, pooled
    want = (want - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-3) * g + be
    np.testing.assert_allclose(predict(fused, x), want, rtol=1e-4, atol=1e-4)


def test_bn_inside_a_nested_model_is_reported_not_checked() -> None:
    inner_in = keras.Input((8,))
    inner = keras.Model(
        inner_in, keras.layers.BatchNormalization(name="inner_bn")(inner_in), name="inner"
    )
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, name="d")(x)
    y = keras.layers.BatchNormalization(name="outer_bn")(inner(h))
    model = keras.Model(x, y)
    for inputs in (None, {"x": data()}):  # never updated: its weights say so, run or not
        stats = {s.bn: s for s in bnfuse.fuse(model, check_stats=True, inputs=inputs).bn_stats}
        assert stats["inner_bn"].flag == "default" and stats["inner_bn"].scope == "inner"
        assert "not run" in stats["inner_bn"].note
    bn = inner.get_layer("inner_bn")
    bn.set_weights([np.full(8, 2.0), np.ones(8), np.ones(8), np.full(8, 3.0)])
    res = bnfuse.fuse(model, check_stats=True, inputs={"x": data()})
    stats = {s.bn: s for s in res.bn_stats}
    assert stats["inner_bn"].flag == "not-checked" and stats["inner_bn"].mean_shift is None
    assert stats["outer_bn"].flag == "default" and stats["outer_bn"].samples == 40
    assert res.bn_stats[-1].bn == "inner_bn"  # worst first: not-checked goes last
