"""The Keras 3 fold harness, run on Keras 2 (``tf_keras``) models: one set of cases.

Every case of :mod:`test_keras_folds` is built a second time with ``tf_keras`` in place
of ``keras`` (the case builders look ``keras`` and ``L`` up in their module when called),
randomized, fused through the shared Keras backend and checked exactly as for Keras 3:
folds, refusal reasons, outputs, BN layers gone, the input untouched, a ``tf_keras``
model back. Keras 2's own BN variants and its rewording of an axis (it stores axes as
positive lists) are the only differences, listed below.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

import test_keras_folds as K3
import tf_keras
from keras_helpers import check_fused, fuse, randomize, sample_inputs

import bnfuse
from bnfuse.keras.compat import flavor_of

pytestmark = pytest.mark.keras

L2 = tf_keras.layers

#: Keras 3-only constructor options (Keras 2 has SyncBatchNormalization instead).
SKIP = {"bn-synchronized"}

#: Keras 2 normalizes a BN axis to a positive index when the layer is built.
REFUSALS = {
    "wrong-axis-dense-refused": {
        "bn": "BN axis 1 is not the channel axis of 'lin' (axis 2 of rank 3)"
    },
}


@contextmanager
def keras2() -> Iterator[None]:
    """Case builders of test_keras_folds build tf_keras models inside this block."""
    saved = K3.keras, K3.L
    K3.keras, K3.L = tf_keras, L2
    try:
        yield
    finally:
        K3.keras, K3.L = saved


def build2(case_id: str) -> Any:
    case = K3.CASES[case_id]
    with keras2():
        model = case.build()
    assert flavor_of(model).version == 2, type(model).__mro__
    return randomize(model, seed=len(case_id), zero_shift=case.zero_shift)


@pytest.mark.parametrize("case_id", [c for c in K3.CASES if c not in SKIP])
def test_fold_keras2(case_id: str) -> None:
    case = K3.CASES[case_id]
    model = build2(case_id)
    refusals = REFUSALS.get(case_id, case.refusals)
    res = check_fused(model, folds=case.folds, refusals=refusals)
    assert flavor_of(res.model).version == 2
    assert isinstance(res.model, tf_keras.Model)
    if case.refusal_rules:
        assert {r.bn: r.rule for r in res.refusals} == case.refusal_rules
    if case.details:
        assert {f.bn: f.detail for f in res.folds} == case.details


@pytest.mark.parametrize("case_id", ["nested-models", "two-inputs-two-outputs", "mlp-three-bns"])
def test_public_api_validates_keras2(case_id: str) -> None:
    """bnfuse.fuse takes a tf_keras model, validates with tf_keras and returns one."""
    case = K3.CASES[case_id]
    model = build2(case_id)
    res = bnfuse.fuse(model, samples=2)
    assert {f.bn: (f.into, f.rule, f.direction) for f in res.folds} == case.folds
    assert res.validation is not None and res.validation.passed
    assert "Keras 2 (tf_keras" in res.validation.runtime
    assert isinstance(res.model, tf_keras.Model)
    assert res.after.bn_nodes == 0
    summary_counts = (
        sum(int(np.prod(w.shape)) for w in model.trainable_weights),
        sum(int(np.prod(w.shape)) for w in model.non_trainable_weights),
    )
    assert (res.before.trainable_params, res.before.non_trainable_params) == summary_counts


def _chain2(*layers: Any, shape: tuple[int, ...] = (6, 6, 2)) -> Any:
    x = inp = tf_keras.Input(shape, name="x")
    for layer in layers:
        x = layer(x)
    return tf_keras.Model(inp, x)


@pytest.mark.parametrize(
    "bn",
    [
        lambda: L2.BatchNormalization(name="bn", fused=True),
        lambda: L2.BatchNormalization(name="bn", fused=False),
        lambda: L2.BatchNormalization(name="bn", renorm=True, renorm_clipping={"rmax": 2.0}),
        lambda: L2.BatchNormalization(name="bn", virtual_batch_size=1),
        lambda: L2.BatchNormalization(name="bn", adjustment=lambda shape: (1.5, 0.5)),
        lambda: L2.experimental.SyncBatchNormalization(name="bn"),
        lambda: L2.BatchNormalization(name="bn", epsilon=1e-7, fused=True),
    ],
    ids=["fused", "not-fused", "renorm", "virtual-batch", "adjustment", "sync", "fused-tiny-eps"],
)
def test_keras2_bn_variants(bn: Any) -> None:
    """Training-time options change nothing at inference: the moving statistics fold
    (a fused BN keeps an epsilon below cuDNN's 1.001e-5 at inference on TF 2.21)."""
    model = randomize(_chain2(L2.Conv2D(3, 3, name="lin"), bn()))
    res = check_fused(model, folds={"bn": ("lin", "conv-bn", "backward")}, rtol=2e-6)
    assert flavor_of(res.model).version == 2
    xs = sample_inputs(model, batch=4)
    assert np.asarray(res.model(xs[0], training=False)).shape == (4, 4, 4, 3)


def test_tf_ops_in_a_keras2_functional_model() -> None:
    """Keras 2 records raw TensorFlow calls as TFOpLambda layers whose config nodes take
    other forms (one entry not wrapped in a list, tensors inside the call kwargs): a BN
    whose output reaches one only through its kwargs still folds, and is rewired."""
    import tensorflow as tf

    i = tf_keras.Input((6,), name="x")
    a = L2.Dense(5, name="da")(i)
    b = L2.BatchNormalization(name="bn")(L2.Dense(5, name="lin")(i))
    c = tf.math.add(a, b)  # b is the "y" kwarg of the TFOpLambda node
    d = L2.BatchNormalization(name="bn2")(L2.Dense(3, name="lin2")(c))
    model = randomize(tf_keras.Model(i, tf.nn.relu(d)))
    nodes = {
        e["name"]: e["inbound_nodes"]
        for e in model.get_config()["layers"]
        if e["class_name"] == "TFOpLambda"
    }
    assert nodes["tf.math.add"] == [["da", 0, 0, {"y": ["bn", 0, 0]}]]
    res = check_fused(
        model,
        folds={"bn": ("lin", "dense-bn", "backward"), "bn2": ("lin2", "dense-bn", "backward")},
    )
    cfg = {e["name"]: e for e in res.model.get_config()["layers"]}
    assert cfg["tf.math.add"]["inbound_nodes"] == [["da", 0, 0, {"y": ["lin", 0, 0]}]]


def test_keras2_mixed_precision_and_float16_overflow() -> None:
    """Keras 2 dtype policies: float32 variables under mixed_float16 fold and keep their
    policy; a float16 fold that would overflow is refused as in Keras 3."""
    mp = "mixed_float16"
    x = inp = tf_keras.Input((8, 8, 3), name="x")
    x = L2.Conv2D(4, 3, use_bias=False, dtype=mp, name="conv")(x)
    x = L2.BatchNormalization(dtype=mp, name="bn1")(x)
    x = L2.Flatten(dtype=mp, name="flat")(L2.ReLU(dtype=mp, name="relu")(x))
    x = L2.Dense(5, dtype=mp, name="dense")(x)
    model = randomize(tf_keras.Model(inp, L2.Activation("linear", dtype="float32")(x)))
    res = check_fused(model, folds={"bn1": ("conv", "conv-bn", "backward")}, rtol=1e-2)
    conv = res.model.get_layer("conv")
    assert conv.dtype_policy.name == mp and all(v.dtype == "float32" for v in conv.weights)

    x16 = tf_keras.Input((4,), name="x", dtype="float16")
    y = L2.Dense(3, dtype="float16", name="lin")(x16)
    m16 = tf_keras.Model(x16, L2.BatchNormalization(dtype="float16", name="bn")(y))
    m16.get_layer("lin").set_weights([np.full((4, 3), 100.0), np.zeros(3)])
    m16.get_layer("bn").set_weights(
        [np.full(3, 1000.0), np.zeros(3), np.zeros(3), np.full(3, 1e-6)]
    )
    m16.get_layer("bn").epsilon = 0.0
    got = fuse(m16)
    assert [(r.bn, r.reason) for r in got.refusals] == [
        ("bn", "folded values of 'lin' overflow float16 (fold refused)")
    ]
