"""Keras refusal reasons no other test reached, one model each (exact reason asserted):
every BN is folded or refused with a reason, and each reason has a test."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("tensorflow")

import keras
import numpy as np
from keras import layers as L
from keras_helpers import assert_same_outputs, check_fused, fuse, randomize, sample_inputs

pytestmark = pytest.mark.keras

NO_BEFORE = "before: ReLU 'relu' is not a linear layer"


def relu_bn_model(*after: Any, shape: tuple[int, ...] = (4,), outputs: str = "last") -> Any:
    """x -> ReLU -> BN -> ``after`` layers; ``outputs="bn+last"`` also outputs the BN."""
    inp = keras.Input(shape, name="x")
    y = L.BatchNormalization(name="bn")(L.ReLU(name="relu")(inp))
    bn_out = y
    for layer in after:
        y = layer(y)
    outs = [bn_out, y] if outputs == "bn+last" else y
    return randomize(keras.Model(inp, outs), seed=7)


def test_bn_output_that_is_also_a_model_output_does_not_fold_forward() -> None:
    model = relu_bn_model(L.Dense(3, name="lin"), outputs="bn+last")
    check_fused(model, refusals={"bn": "BN output is also a model output"})


def test_flatten_not_followed_by_dense() -> None:
    model = relu_bn_model(L.Flatten(name="flat"), L.ReLU(name="relu2"), shape=(2, 2, 3))
    reason = (
        f"no linear layer next to BN ({NO_BEFORE}; "
        "after: Flatten 'flat' is not followed by Dense layers only)"
    )
    check_fused(model, refusals={"bn": reason})


def test_flatten_output_that_is_a_model_output() -> None:
    inp = keras.Input((2, 2, 3), name="x")
    flat = L.Flatten(name="flat")(L.BatchNormalization(name="bn")(L.ReLU(name="relu")(inp)))
    model = randomize(keras.Model(inp, [flat, L.Dense(2, name="lin")(flat)]), seed=8)
    check_fused(model, refusals={"bn": "output of 'flat' is a model output"})


def test_bad_statistics_refused() -> None:
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Dense(4, name="lin")(inp)))
    randomize(model, seed=9)
    bn = model.get_layer("bn")
    bn.moving_variance.assign(np.array([1.0, -1.0, 1.0, 1.0], "float32"))
    # the original computes NaN on that channel: nothing to compare outputs with
    check_fused(model, refusals={"bn": "variance + epsilon <= 0: BN is undefined"}, compare=False)


def test_subclass_of_batch_normalization_refused() -> None:
    @keras.saving.register_keras_serializable(package="bnfuse_tests")
    class MyBN(L.BatchNormalization):
        pass

    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, MyBN(name="bn")(L.Dense(4, name="lin")(inp)))
    randomize(model, seed=10)
    reason = "subclass of BatchNormalization (MyBN): its call may differ"
    check_fused(model, refusals={"bn": reason})


def test_bn_on_the_batch_axis_refused() -> None:
    inp = keras.Input((4,), name="x", batch_size=3)
    model = keras.Model(inp, L.BatchNormalization(axis=0, name="bn")(L.Dense(4, name="lin")(inp)))
    randomize(model, seed=11)
    check_fused(model, refusals={"bn": "BN normalizes the batch axis"})


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_lora_layer_refused(direction: str) -> None:
    """A Dense with LoRA enabled computes kernel + A·B: folding into the kernel alone
    would leave the low-rank term unscaled."""
    inp = keras.Input((4,), name="x")
    lin = L.Dense(4, name="lin")
    if direction == "backward":
        y = L.BatchNormalization(name="bn")(lin(inp))
    else:
        y = lin(L.BatchNormalization(name="bn")(L.ReLU(name="relu")(inp)))
    model = randomize(keras.Model(inp, y), seed=12)
    lin.enable_lora(2)
    lin.lora_kernel_b.assign(np.full((2, 4), 0.5, "float32"))  # a trained low-rank term
    res = fuse(model)
    assert not res.folds
    assert [(r.bn, r.reason) for r in res.refusals] == [("bn", "layer 'lin' has LoRA enabled")]
    xs = sample_inputs(model)
    assert_same_outputs(model, res.model, xs)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_fold_that_overflows_float16_refused(direction: str) -> None:
    """A float16 kernel near the dtype's limit, scaled by 4: the fold is refused, in the
    same words as the ONNX backend's."""
    inp = keras.Input((4,), name="x", dtype="float16")
    lin = L.Dense(4, name="lin", dtype="float16")
    bn = L.BatchNormalization(name="bn", dtype="float16")
    y = bn(lin(inp)) if direction == "backward" else lin(bn(L.ReLU(name="relu")(inp)))
    model = keras.Model(inp, y)
    lin.kernel.assign(np.full((4, 4), 30000.0, "float16"))
    bn.gamma.assign(np.full(4, 4.0, "float16"))
    res = fuse(model)
    assert not res.folds
    assert [(r.bn, r.reason, r.code) for r in res.refusals] == [
        ("bn", "folded values of 'lin' overflow float16 (fold refused)", "overflow")
    ]


def test_forward_into_a_layer_shared_by_several_call_sites() -> None:
    inp = keras.Input((4,), name="x")
    lin = L.Dense(3, name="lin")
    a = lin(L.BatchNormalization(name="bn")(L.ReLU(name="relu")(inp)))
    b = lin(L.ReLU(name="relu2")(inp))
    model = randomize(keras.Model(inp, [a, b]), seed=13)
    check_fused(model, refusals={"bn": "layer 'lin' is shared by several call sites"})


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_quantized_layer_refused(direction: str) -> None:
    inp = keras.Input((4,), name="x")
    lin = L.Dense(4, name="lin")
    if direction == "backward":
        y = L.BatchNormalization(name="bn")(lin(inp))
    else:
        y = lin(L.BatchNormalization(name="bn")(L.ReLU(name="relu")(inp)))
    model = randomize(keras.Model(inp, y), seed=14)
    lin.quantize("int8")
    res = fuse(model)
    assert not res.folds
    assert [(r.bn, r.reason) for r in res.refusals] == [("bn", "layer 'lin' is quantized (int8)")]
    assert_same_outputs(model, res.model, sample_inputs(model))
