"""One harness for every Keras layer kind and BN variant: fold, compare, check the report.

Each case builds a tiny model, randomizes every weight and BN statistic, fuses it through
``KerasBackend().fuse`` and through the public ``bnfuse.fuse`` (which validates), and
checks outputs (``model(x, training=False)``, 1e-5 relative), which BNs folded where by
which rule, and the exact reason of every refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("tensorflow")

import keras
from keras import layers as L
from keras_helpers import check_fused, randomize

import bnfuse
from bnfuse.reasons import PADDING, TRANSPOSE_SHIFT

pytestmark = pytest.mark.keras

ACT = "activation between layer and BN"
SCALE_ONLY = "scale only (BN shift is exactly zero; padding stays zero)"


def chain(shape: tuple[int, ...], *layers: Any, name: str = "m") -> keras.Model:
    x = inp = keras.Input(shape, name="x")
    for layer in layers:
        x = layer(x)
    return keras.Model(inp, x, name=name)


def BN(name: str = "bn", **kw: Any) -> L.BatchNormalization:
    return L.BatchNormalization(name=name, **kw)


@dataclass
class Case:
    build: Callable[[], keras.Model]
    folds: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    zero_shift: tuple[str, ...] = ()
    refusal_rules: dict[str, str] = field(default_factory=dict)  # checked when given
    details: dict[str, str] = field(default_factory=dict)  # fold details, checked when given


def back(into: str = "lin", rule: str = "conv-bn") -> tuple[str, str, str]:
    return (into, rule, "backward")


def fwd(into: str = "lin", rule: str = "bn-conv") -> tuple[str, str, str]:
    return (into, rule, "forward")


# --------------------------------------------------------------------------- backward


def _two_input_model() -> keras.Model:
    a = keras.Input((6,), name="a")
    b = keras.Input((6, 6, 2), name="b")
    ya = BN("bn_a")(L.Dense(5, name="dense_a")(a))
    yb = BN("bn_b")(L.Conv2D(3, 3, name="conv_b")(b))
    yb = L.GlobalAveragePooling2D(name="gap")(yb)
    z = L.Concatenate(name="cat")([ya, yb])
    out = L.Dense(2, name="head")(z)
    return keras.Model([a, b], [out, ya], name="two_io")


def _shared_conv_one_bn() -> keras.Model:
    a = keras.Input((6, 6, 2), name="a")
    b = keras.Input((6, 6, 2), name="b")
    conv = L.Conv2D(3, 1, name="lin")
    return keras.Model([a, b], [BN()(conv(a)), conv(b)])


def _shared_conv_shared_bn() -> keras.Model:
    a = keras.Input((6, 6, 2), name="a")
    b = keras.Input((6, 6, 2), name="b")
    conv, bn = L.Conv2D(3, 1, name="lin"), BN()
    return keras.Model([a, b], [L.ReLU(name="ra")(bn(conv(a))), L.ReLU(name="rb")(bn(conv(b)))])


def _shared_bn_two_producers() -> keras.Model:
    a = keras.Input((6, 6, 2), name="a")
    bn = BN()
    y1 = bn(L.Conv2D(3, 1, name="c1")(a))
    y2 = bn(L.Conv2D(3, 1, name="c2")(a))
    return keras.Model(a, [y1, y2])


def _producer_two_consumers() -> keras.Model:
    a = keras.Input((6, 6, 2), name="x")
    y = L.Conv2D(3, 3, name="lin")(a)
    return keras.Model(a, [BN()(y), L.ReLU(name="r")(y)])


def _producer_is_output() -> keras.Model:
    a = keras.Input((6, 6, 2), name="x")
    y = L.Conv2D(3, 3, name="lin")(a)
    return keras.Model(a, [BN()(y), y])


def _bn_output_and_consumer() -> keras.Model:
    a = keras.Input((6, 6, 2), name="x")
    y = BN()(L.Conv2D(3, 3, name="lin")(a))
    return keras.Model(a, [y, L.ReLU(name="r")(y)])


def _training_true() -> keras.Model:
    a = keras.Input((6, 6, 2), name="x")
    y = BN()(L.Conv2D(3, 3, name="lin")(a), training=True)
    return keras.Model(a, y)


def _nested() -> keras.Model:
    inner_in = keras.Input((8, 8, 3), name="inner_x")
    y = BN("ibn")(L.Conv2D(4, 3, name="iconv")(inner_in))
    inner = keras.Model(inner_in, L.ReLU(name="irelu")(y), name="inner")
    seq = keras.Sequential(
        [keras.Input((6, 6, 4)), L.DepthwiseConv2D(3, name="sdw"), BN("sbn")], name="seq"
    )
    x = keras.Input((8, 8, 3), name="x")
    z = seq(inner(x))
    z = BN("obn")(L.Conv2D(2, 1, name="oconv")(z))
    return keras.Model(x, z, name="outer")


def _sequential() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, name="conv"),
            BN("bn1"),
            L.ReLU(name="relu"),
            L.Flatten(name="flat"),
            L.Dense(5, name="dense"),
            BN("bn2"),
        ],
        name="seq",
    )


def _chain() -> keras.Model:
    return chain(
        (8, 8, 3),
        L.Conv2D(4, 3, name="conv1"),
        BN("bn1"),
        L.ReLU(name="relu"),
        BN("bn2"),
        L.Conv2D(5, 3, name="conv2"),
    )


def _mlp3() -> keras.Model:
    return chain(
        (6, 5),
        BN("bn1"),
        L.Flatten(name="flat"),
        L.Dense(8, name="d1"),
        L.ReLU(name="r1"),
        BN("bn2"),
        L.Dense(7, activation="relu", name="d2"),
        BN("bn3"),
        L.Dense(3, name="d3"),
    )


def _bn_two_dense() -> keras.Model:
    x = keras.Input((6,), name="x")
    y = BN()(L.ReLU(name="r")(x))
    return keras.Model(x, [L.Dense(3, name="da")(y), L.Dense(2, name="db")(y)])


def _bn_flatten_dense_and_relu() -> keras.Model:
    x = keras.Input((4, 4, 3), name="x")
    y = L.Flatten(name="flat")(BN()(L.ReLU(name="r")(x)))
    return keras.Model(x, [L.Dense(3, name="da")(y), L.ReLU(name="r2")(y)])


def _bn_flatten_dense_and_padded_conv() -> keras.Model:
    x = keras.Input((6, 6, 3), name="x")
    y = BN()(L.ReLU(name="r")(x))
    d = L.Dense(3, name="da")(L.Flatten(name="flat")(y))
    return keras.Model(x, [d, L.Conv2D(4, 3, padding="same", name="lin")(y)])


def _bn_dense_and_relu() -> keras.Model:
    x = keras.Input((6,), name="x")
    y = BN()(L.ReLU(name="r")(x))
    return keras.Model(x, [L.Dense(3, name="da")(y), L.ReLU(name="r2")(y)])


CASES: dict[str, Case] = {
    # backward, every layer kind
    "dense": Case(lambda: chain((6,), L.Dense(5, name="lin"), BN()), {"bn": back(rule="dense-bn")}),
    "dense-rank3-axis2": Case(
        lambda: chain((4, 6), L.Dense(5, name="lin"), BN(axis=2)), {"bn": back(rule="dense-bn")}
    ),
    "dense-rank4-no-bias": Case(
        lambda: chain((3, 4, 6), L.Dense(5, use_bias=False, name="lin"), BN()),
        {"bn": back(rule="dense-bn")},
    ),
    "conv1d-stride": Case(
        lambda: chain((9, 3), L.Conv1D(4, 3, strides=2, name="lin"), BN()), {"bn": back()}
    ),
    "conv2d-groups-no-bias": Case(
        lambda: chain((8, 8, 4), L.Conv2D(6, 3, groups=2, use_bias=False, name="lin"), BN(axis=3)),
        {"bn": back()},
    ),
    "conv3d": Case(lambda: chain((5, 5, 5, 2), L.Conv3D(3, 2, name="lin"), BN()), {"bn": back()}),
    "depthwise1d-mult2": Case(
        lambda: chain((9, 3), L.DepthwiseConv1D(3, depth_multiplier=2, name="lin"), BN()),
        {"bn": back(rule="depthwise-bn")},
    ),
    "depthwise2d-mult2-no-bias": Case(
        lambda: chain(
            (8, 8, 3),
            L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, padding="same", name="lin"),
            BN(),
        ),
        {"bn": back(rule="depthwise-bn")},
    ),
    "separable1d": Case(
        lambda: chain((9, 3), L.SeparableConv1D(4, 3, name="lin"), BN()),
        {"bn": back(rule="separable-bn")},
    ),
    "separable2d-mult2": Case(
        lambda: chain((8, 8, 3), L.SeparableConv2D(5, 3, depth_multiplier=2, name="lin"), BN()),
        {"bn": back(rule="separable-bn")},
    ),
    "conv1d-transpose": Case(
        lambda: chain((5, 3), L.Conv1DTranspose(4, 3, strides=2, name="lin"), BN()),
        {"bn": back(rule="conv-transpose-bn")},
    ),
    "conv2d-transpose-no-bias": Case(
        lambda: chain(
            (4, 4, 3), L.Conv2DTranspose(4, 3, strides=2, use_bias=False, name="lin"), BN()
        ),
        {"bn": back(rule="conv-transpose-bn")},
    ),
    "conv3d-transpose": Case(
        lambda: chain((3, 3, 3, 2), L.Conv3DTranspose(3, 2, strides=2, name="lin"), BN()),
        {"bn": back(rule="conv-transpose-bn")},
    ),
    # BN variants
    "bn-no-center": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(center=False)), {"bn": back()}
    ),
    "bn-no-scale": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(scale=False)), {"bn": back()}
    ),
    "bn-no-center-no-scale": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(center=False, scale=False)),
        {"bn": back()},
    ),
    "bn-epsilon": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(epsilon=0.7)), {"bn": back()}
    ),
    "bn-synchronized": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(synchronized=True)),
        {"bn": back()},
    ),
    "bn-renorm": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(renorm=True)), {"bn": back()}
    ),
    "bn-positive-axis": Case(
        lambda: chain((6, 6, 2), L.Conv2D(3, 3, name="lin"), BN(axis=3)), {"bn": back()}
    ),
    # graph shapes
    "bn-output-and-consumer": Case(_bn_output_and_consumer, {"bn": back()}),
    "two-inputs-two-outputs": Case(
        _two_input_model,
        {"bn_a": back("dense_a", "dense-bn"), "bn_b": back("conv_b", "conv-bn")},
    ),
    "shared-conv-shared-bn": Case(_shared_conv_shared_bn, {"bn": back()}),
    "nested-models": Case(
        _nested,
        {
            "ibn": back("iconv"),
            "sbn": back("sdw", "depthwise-bn"),
            "obn": back("oconv"),
        },
    ),
    "sequential": Case(_sequential, {"bn1": back("conv"), "bn2": back("dense", "dense-bn")}),
    # forward
    "first-bn-dense": Case(
        lambda: chain((6,), BN(), L.Dense(4, name="lin")), {"bn": fwd(rule="bn-dense")}
    ),
    "first-bn-dense-rank3": Case(
        lambda: chain((3, 6), BN(axis=-1), L.Dense(4, use_bias=False, name="lin")),
        {"bn": fwd(rule="bn-dense")},
    ),
    "first-bn-flatten-dense-axis1": Case(
        lambda: chain((28, 28), BN(axis=1), L.Flatten(name="flat"), L.Dense(10, name="lin")),
        {"bn": fwd(rule="bn-flatten-dense")},
    ),
    "first-bn-flatten-dense-axis-1": Case(
        lambda: chain((28, 28), BN(axis=-1), L.Flatten(name="flat"), L.Dense(10, name="lin")),
        {"bn": fwd(rule="bn-flatten-dense")},
    ),
    "bn-flatten-dense-image": Case(
        lambda: chain(
            (4, 4, 3), L.ReLU(name="r"), BN(), L.Flatten(name="flat"), L.Dense(5, name="lin")
        ),
        {"bn": fwd(rule="bn-flatten-dense")},
    ),
    "bn-reshape-dense": Case(
        lambda: chain(
            (4, 3),
            L.ReLU(name="r"),
            BN(axis=1),
            L.Reshape((-1,), name="rs"),
            L.Dense(5, name="lin"),
        ),
        {"bn": fwd(rule="bn-flatten-dense")},
    ),
    "relu-bn-conv-valid": Case(
        lambda: chain(
            (8, 8, 3),
            L.Conv2D(4, 3, activation="relu", name="c0"),
            BN(),
            L.Conv2D(5, 3, name="lin"),
        ),
        {"bn": fwd()},
    ),
    "relu-bn-conv-groups": Case(
        lambda: chain((8, 8, 4), L.ReLU(name="r"), BN(), L.Conv2D(6, 3, groups=2, name="lin")),
        {"bn": fwd()},
    ),
    "relu-bn-conv1d-dilated": Case(
        lambda: chain((12, 3), L.ReLU(name="r"), BN(), L.Conv1D(4, 3, dilation_rate=2, name="lin")),
        {"bn": fwd()},
    ),
    "relu-bn-conv3d": Case(
        lambda: chain((4, 4, 4, 2), L.ReLU(name="r"), BN(), L.Conv3D(3, 2, name="lin")),
        {"bn": fwd()},
    ),
    "relu-bn-depthwise-mult2": Case(
        lambda: chain(
            (8, 8, 3), L.ReLU(name="r"), BN(), L.DepthwiseConv2D(3, depth_multiplier=2, name="lin")
        ),
        {"bn": fwd(rule="bn-depthwise")},
    ),
    "relu-bn-separable-mult2": Case(
        lambda: chain(
            (8, 8, 3),
            L.ReLU(name="r"),
            BN(),
            L.SeparableConv2D(4, 3, depth_multiplier=2, name="lin"),
        ),
        {"bn": fwd(rule="bn-separable")},
    ),
    "relu-bn-separable1d-no-bias": Case(
        lambda: chain(
            (9, 3), L.ReLU(name="r"), BN(), L.SeparableConv1D(4, 3, use_bias=False, name="lin")
        ),
        {"bn": fwd(rule="bn-separable")},
    ),
    "relu-bn-conv1x1-same": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.Conv2D(4, 1, padding="same", name="lin")
        ),
        {"bn": fwd()},
    ),
    "relu-bn-conv-same-no-pad-needed": Case(
        lambda: chain(
            (8, 8, 3), L.ReLU(name="r"), BN(), L.Conv2D(4, 2, strides=2, padding="same", name="lin")
        ),
        {"bn": fwd()},
    ),
    "relu-bn-conv-same-refused": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.Conv2D(4, 3, padding="same", name="lin")
        ),
        refusals={"bn": PADDING},
        refusal_rules={"bn": "bn-conv"},
    ),
    "relu-bn-conv1d-causal-refused": Case(
        lambda: chain((8, 3), L.ReLU(name="r"), BN(), L.Conv1D(4, 3, padding="causal", name="lin")),
        refusals={"bn": PADDING},
        refusal_rules={"bn": "bn-conv"},
    ),
    "relu-bn-depthwise-same-refused": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.DepthwiseConv2D(3, padding="same", name="lin")
        ),
        refusals={"bn": PADDING},
        refusal_rules={"bn": "bn-depthwise"},
    ),
    "relu-bn-separable-same-refused": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.SeparableConv2D(4, 3, padding="same", name="lin")
        ),
        refusals={"bn": PADDING},
        refusal_rules={"bn": "bn-separable"},
    ),
    "relu-bn-conv-same-zero-shift": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.Conv2D(4, 3, padding="same", name="lin")
        ),
        {"bn": fwd()},
        zero_shift=("bn",),
        details={"bn": SCALE_ONLY},
    ),
    "relu-bn-depthwise-same-zero-shift": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.DepthwiseConv2D(3, padding="same", name="lin")
        ),
        {"bn": fwd(rule="bn-depthwise")},
        zero_shift=("bn",),
        details={"bn": SCALE_ONLY},
    ),
    "relu-bn-separable-same-zero-shift": Case(
        lambda: chain(
            (6, 6, 3), L.ReLU(name="r"), BN(), L.SeparableConv2D(4, 3, padding="same", name="lin")
        ),
        {"bn": fwd(rule="bn-separable")},
        zero_shift=("bn",),
        details={"bn": SCALE_ONLY},
    ),
    "relu-bn-transpose-refused": Case(
        lambda: chain((4, 4, 3), L.ReLU(name="r"), BN(), L.Conv2DTranspose(4, 3, name="lin")),
        refusals={"bn": TRANSPOSE_SHIFT},
        refusal_rules={"bn": "bn-conv-transpose"},
    ),
    "relu-bn-transpose-zero-shift": Case(
        lambda: chain(
            (4, 4, 3), L.ReLU(name="r"), BN(), L.Conv2DTranspose(4, 3, strides=2, name="lin")
        ),
        {"bn": fwd(rule="bn-conv-transpose")},
        zero_shift=("bn",),
    ),
    "dense-activation-then-dense": Case(
        lambda: chain((6,), L.Dense(5, activation="relu", name="d0"), BN(), L.Dense(3, name="lin")),
        {"bn": fwd(rule="bn-dense")},
    ),
    "both-directions-prefers-backward": Case(
        lambda: chain((8, 8, 3), L.Conv2D(4, 3, name="lin"), BN(), L.Conv2D(5, 3, name="c2")),
        {"bn": back()},
    ),
    "chain-backward-then-forward": Case(_chain, {"bn1": back("conv1"), "bn2": fwd("conv2")}),
    "mlp-three-bns": Case(
        _mlp3,
        {
            "bn1": fwd("d1", "bn-flatten-dense"),
            "bn2": fwd("d2", "bn-dense"),
            "bn3": fwd("d3", "bn-dense"),
        },
    ),
    "bn-two-dense-consumers": Case(_bn_two_dense, {"bn": fwd("da, db", "bn-dense")}),
    # refusals
    "activation-refused": Case(
        lambda: chain((6,), L.Dense(5, activation="relu", name="lin"), BN()), refusals={"bn": ACT}
    ),
    "activation-and-padding-refused": Case(
        lambda: chain(
            (6, 6, 3),
            L.Conv2D(4, 1, activation="relu", name="c0"),
            BN(),
            L.Conv2D(4, 3, padding="same", name="lin"),
        ),
        refusals={"bn": f"{ACT}; forward: {PADDING}"},
    ),
    "wrong-axis-refused": Case(
        lambda: chain((8, 8, 2), L.Conv2D(3, 3, name="lin"), BN(axis=1)),
        refusals={"bn": "BN axis 1 is not the channel axis of 'lin' (axis 3 of rank 4)"},
    ),
    "wrong-axis-dense-refused": Case(
        lambda: chain((4, 6), L.Dense(5, name="lin"), BN(axis=-2)),
        refusals={"bn": "BN axis -2 is not the channel axis of 'lin' (axis 2 of rank 3)"},
    ),
    "wrong-axis-forward-refused": Case(
        lambda: chain((4, 6), BN(axis=1), L.Dense(5, name="lin")),
        refusals={"bn": "BN axis 1 is not the input channel axis of 'lin' (axis 2 of rank 3)"},
    ),
    "producer-two-consumers-refused": Case(
        _producer_two_consumers,
        refusals={"bn": "output of 'lin' is also used by other layers"},
    ),
    "producer-is-output-refused": Case(
        _producer_is_output, refusals={"bn": "output of 'lin' is also a model output"}
    ),
    "shared-conv-refused": Case(
        _shared_conv_one_bn, refusals={"bn": "layer 'lin' is shared by several call sites"}
    ),
    "shared-bn-two-producers-refused": Case(
        _shared_bn_two_producers,
        refusals={"bn": "BN layer is shared by several call sites with different inputs"},
    ),
    "bn-consumer-not-linear-refused": Case(
        _bn_dense_and_relu,
        refusals={"bn": "not every layer after BN can take it: ReLU 'r2' is not a linear layer"},
        refusal_rules={"bn": "bn-dense"},
    ),
    "bn-flatten-dense-and-relu-refused": Case(
        _bn_flatten_dense_and_relu,
        refusals={
            "bn": "not every layer after BN can take it: "
            "ReLU 'r2' (via Flatten 'flat') is not a linear layer"
        },
        refusal_rules={"bn": "bn-flatten-dense"},
    ),
    "bn-flatten-dense-and-padded-conv-refused": Case(
        _bn_flatten_dense_and_padded_conv,
        refusals={"bn": f"not every layer after BN can take it: {PADDING}"},
        refusal_rules={"bn": "bn-conv"},
    ),
    "bn-between-nonlinear-refused": Case(
        lambda: chain((6,), L.ReLU(name="r"), BN(), L.ReLU(name="r2")),
        refusals={
            "bn": "no linear layer next to BN (before: ReLU 'r' is not a linear layer; "
            "after: ReLU 'r2' is not a linear layer)"
        },
    ),
    "training-true-refused": Case(
        _training_true,
        refusals={
            "bn": "BN is called with training=True (batch statistics, not a constant affine)"
        },
    ),
}


@pytest.mark.parametrize("case_id", list(CASES))
def test_fold(case_id: str) -> None:
    case = CASES[case_id]
    model = randomize(case.build(), seed=len(case_id), zero_shift=case.zero_shift)
    res = check_fused(model, folds=case.folds, refusals=case.refusals)
    # the public API gives the same folds and its validation passes
    api = bnfuse.fuse(model, samples=2)
    assert {f.bn: (f.into, f.rule, f.direction) for f in api.folds} == case.folds
    assert {r.bn: r.reason for r in api.refusals} == case.refusals
    if case.folds:
        assert api.validation is not None and api.validation.passed
    assert api.after.bn_nodes == len(case.refusals)
    if case.refusal_rules:
        assert {r.bn: r.rule for r in res.refusals} == case.refusal_rules
    if case.details:
        assert {f.bn: f.detail for f in res.folds} == case.details
    assert [f.channels > 0 for f in res.folds] == [True] * len(res.folds)


def test_transposed_conv_spreads_a_constant_unevenly() -> None:
    """Why a BN shift cannot fold forward into a transposed convolution, even 'valid':
    a constant input does not give a constant output per channel (borders sum fewer taps),
    so ``W·t`` is no bias."""
    import numpy as np

    layer = L.Conv2DTranspose(2, 3, strides=2, use_bias=False)
    out = np.asarray(layer(np.ones((1, 4, 4, 3), "float32")))
    assert not np.allclose(out, out[:1, :1, :1, :])
