"""BN over several axes (Keras 2's list ``axis``) and Keras's other fixed affines
(``Normalization`` after ``adapt()``, ``Rescaling``), in both Kerases where they exist.

Each case builds a tiny model, randomizes it (BN statistics included), fuses it and checks
the folds, the exact refusal reasons and codes, that outputs agree and the layers are gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tensorflow")

import keras
from keras_helpers import assert_same_outputs, check_fused, randomize, sample_inputs

import bnfuse
from bnfuse.fold import Affine
from bnfuse.keras.affines import flat_affine
from bnfuse.reasons import PADDING

pytestmark = pytest.mark.keras

try:
    import tf_keras
except ImportError:  # pragma: no cover - the keras extra installs it
    tf_keras = None

KERASES = [pytest.param(keras, id="keras3")]
KERASES.append(
    pytest.param(
        tf_keras,
        id="keras2",
        marks=pytest.mark.skipif(tf_keras is None, reason="tf-keras not installed"),
    )
)
K2 = [k for k in KERASES if k.id == "keras2"]


def chain(K: Any, shape: tuple[int, ...], *layers: Any) -> Any:
    x = inp = K.Input(shape, name="x")
    for layer in layers:
        x = layer(x)
    return K.Model(inp, x, name="m")


def fwd(into: str = "lin", rule: str = "bn-dense") -> tuple[str, str, str]:
    return (into, rule, "forward")


def adapted(K: Any, shape: tuple[int, ...], axis: Any = -1, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    norm = K.layers.Normalization(axis=axis, name="bn")
    norm.adapt(rng.normal(2.0, 3.0, (64, *shape)).astype("float32"))
    return norm


def check(model: Any, folds: dict[str, Any], refusals: dict[str, str], kind: str) -> Any:
    res = check_fused(model, folds=folds, refusals=refusals)
    assert all(f.kind == kind for f in res.folds)
    assert all(r.kind == kind for r in res.refusals)
    layers = {type(layer).__name__ for layer in res.model._flatten_layers(include_self=False)}
    assert (kind in layers) == bool(refusals)
    return res


# --------------------------------------------------------------------------- list axis


@pytest.mark.parametrize("K", K2)
def test_per_pixel_first_layer_bn(K: Any) -> None:
    """The notes' case: BatchNormalization(axis=[1, 2]) on 8x8 images, then an MLP."""
    L = K.layers
    model = randomize(
        chain(
            K,
            (8, 8),
            L.BatchNormalization(axis=[1, 2], name="bn"),
            L.Flatten(name="flat"),
            L.Dense(10, name="lin"),
        )
    )
    res = check_fused(model, folds={"bn": fwd(rule="bn-flatten-dense")})
    assert res.folds[0].channels == 64  # one scale and shift per pixel


@pytest.mark.parametrize("K", K2)
@pytest.mark.parametrize("axis", [[1, 2], [1, 2, 3], [2, 3]])
def test_per_position_bn_after_conv_folds_through_flatten(K: Any, axis: list[int]) -> None:
    L = K.layers
    model = randomize(
        chain(
            K,
            (7, 7, 3),
            L.Conv2D(4, 3, name="conv"),
            L.BatchNormalization(axis=axis, name="bn"),
            L.Reshape((-1,), name="flat"),
            L.Dense(5, name="lin"),
        ),
        seed=sum(axis),
    )
    check_fused(model, folds={"bn": fwd(rule="bn-flatten-dense")})


@pytest.mark.parametrize("K", K2)
def test_list_axis_with_only_the_channel_axis_folds_backward(K: Any) -> None:
    L = K.layers
    model = randomize(
        chain(K, (6, 6, 2), L.Conv2D(3, 3, name="lin"), L.BatchNormalization(axis=[-1], name="bn"))
    )
    check_fused(model, folds={"bn": ("lin", "conv-bn", "backward")})


@pytest.mark.parametrize("K", K2)
def test_list_axis_refusals_name_the_axes(K: Any) -> None:
    L = K.layers
    conv_conv = randomize(
        chain(
            K,
            (6, 6, 2),
            L.Conv2D(3, 1, name="c0"),
            L.BatchNormalization(axis=[1, 2, 3], name="bn"),
            L.Conv2D(4, 1, name="lin"),
        )
    )
    res = check_fused(
        conv_conv,
        refusals={
            "bn": "BN normalizes over axes [1, 2, 3]; a backward fold needs exactly the channel "
            "axis of 'c0' (axis 3 of rank 4); forward: BatchNormalization varies over axes "
            "[1, 2, 3], not only the input channel axis of 'lin' (axis 3 of rank 4)"
        },
    )
    assert [r.code for r in res.refusals] == ["axis-mismatch"]
    dense_direct = randomize(
        chain(
            K,
            (8, 8),
            L.ReLU(name="r"),
            L.BatchNormalization(axis=[1, 2], name="bn"),
            L.Dense(4, name="lin"),
        )
    )
    res = check_fused(
        dense_direct,
        refusals={
            "bn": "BatchNormalization varies over axes [1, 2], not only the input channel axis "
            "of 'lin' (axis 2 of rank 3)"
        },
    )
    assert [r.code for r in res.refusals] == ["axis-mismatch"]


# --------------------------------------------------------------------------- fixed affines

CASES: dict[str, tuple[Callable[[Any], Any], dict[str, Any], dict[str, str], str]] = {
    "normalization-dense": (
        lambda K: chain(K, (6,), adapted(K, (6,)), K.layers.Dense(4, name="lin")),
        {"bn": fwd()},
        {},
        "Normalization",
    ),
    "normalization-conv-valid": (
        lambda K: chain(K, (6, 6, 3), adapted(K, (6, 6, 3)), K.layers.Conv2D(4, 3, name="lin")),
        {"bn": fwd(rule="bn-conv")},
        {},
        "Normalization",
    ),
    "normalization-conv-same-refused": (
        lambda K: chain(
            K, (6, 6, 3), adapted(K, (6, 6, 3)), K.layers.Conv2D(4, 3, padding="same", name="lin")
        ),
        {},
        {"bn": PADDING},
        "Normalization",
    ),
    "normalization-two-axes-flatten-dense": (
        lambda K: chain(
            K,
            (4, 5),
            adapted(K, (4, 5), axis=(1, 2)),
            K.layers.Flatten(name="flat"),
            K.layers.Dense(3, name="lin"),
        ),
        {"bn": fwd(rule="bn-flatten-dense")},
        {},
        "Normalization",
    ),
    "rescaling-conv-same-zero-shift": (
        lambda K: chain(
            K,
            (6, 6, 3),
            K.layers.Rescaling(1 / 255, name="bn"),
            K.layers.Conv2D(4, 3, padding="same", name="lin"),
        ),
        {"bn": fwd(rule="bn-conv")},
        {},
        "Rescaling",
    ),
    "rescaling-offset-conv-same-refused": (
        lambda K: chain(
            K,
            (6, 6, 3),
            K.layers.Rescaling(1 / 127.5, offset=-1.0, name="bn"),
            K.layers.Conv2D(4, 3, padding="same", name="lin"),
        ),
        {},
        {"bn": PADDING},
        "Rescaling",
    ),
    "rescaling-offset-flatten-dense": (
        lambda K: chain(
            K,
            (4, 4, 3),
            K.layers.Rescaling(0.5, offset=0.25, name="bn"),
            K.layers.Flatten(name="flat"),
            K.layers.Dense(3, name="lin"),
        ),
        {"bn": fwd(rule="bn-flatten-dense")},
        {},
        "Rescaling",
    ),
    "rescaling-depthwise-valid": (
        lambda K: chain(
            K,
            (6, 6, 3),
            K.layers.Rescaling(2.0, offset=0.5, name="bn"),
            K.layers.DepthwiseConv2D(3, name="lin"),
        ),
        {"bn": fwd(rule="bn-depthwise")},
        {},
        "Rescaling",
    ),
}


@pytest.mark.parametrize("K", KERASES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_fixed_affine(K: Any, case_id: str) -> None:
    build, folds, refusals, kind = CASES[case_id]
    model = randomize(build(K), seed=len(case_id))
    res = check(model, folds, refusals, kind)
    if refusals:
        assert [r.code for r in res.refusals] == ["padding"]


@pytest.mark.parametrize("K", KERASES)
def test_rescaling_chain_folds_whole(K: Any) -> None:
    """Rescaling -> Normalization -> Dense: both fold, one after the other."""
    L = K.layers
    model = randomize(
        chain(K, (6,), L.Rescaling(0.5, name="rs"), adapted(K, (6,)), L.Dense(3, name="lin"))
    )
    res = check_fused(model, folds={"bn": fwd(), "rs": fwd()})
    api = bnfuse.fuse(model, samples=2)
    assert api.validation is not None and api.validation.passed
    assert_same_outputs(model, res.model, sample_inputs(model))


@pytest.mark.parametrize("K", KERASES)
def test_affine_without_linear_neighbour_is_not_reported(K: Any) -> None:
    L = K.layers
    model = randomize(chain(K, (6,), L.Rescaling(0.5, name="rs"), L.ReLU(name="r")))
    res = check_fused(model, folds={}, refusals={})
    assert res.refusals == [] and res.folds == []


@pytest.mark.parametrize("K", KERASES)
def test_inverted_normalization_is_refused(K: Any) -> None:
    L = K.layers
    rng = np.random.default_rng(0)
    norm = L.Normalization(invert=True, name="bn")
    norm.adapt(rng.normal(1.0, 2.0, (32, 6)).astype("float32"))
    model = chain(K, (6,), norm, L.Dense(3, name="lin"))
    res = check_fused(
        model, refusals={"bn": "Normalization with invert=True (not a forward affine)"}
    )
    assert res.refusals[0].kind == "Normalization"


@pytest.mark.parametrize("K", K2)
@pytest.mark.parametrize("axis", [[1, 2], [1, 3], [2, 3], [1, 2, 3]])
def test_list_axis_bn_through_channels_first_flatten(K: Any, axis: list[int]) -> None:
    L = K.layers
    model = randomize(
        chain(
            K,
            (3, 4, 5),
            L.BatchNormalization(axis=axis, name="bn"),
            L.Flatten(data_format="channels_first", name="flat"),
            L.Dense(4, name="lin"),
        ),
        seed=len(axis),
    )
    check_fused(model, folds={"bn": fwd(rule="bn-flatten-dense")})


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    mask=st.lists(st.booleans(), min_size=4, max_size=4),
    channels_first=st.booleans(),
)
def test_flat_affine_matches_broadcast_then_flatten(
    dims: list[int], mask: list[bool], channels_first: bool
) -> None:
    """An affine over ``axes``, broadcast over the input and flattened as Flatten does,
    is what flat_affine (the planning core's flatten_affine) gives per feature."""
    axes = tuple(i + 1 for i in range(len(dims)) if mask[i])
    pshape = [d if i + 1 in axes else 1 for i, d in enumerate(dims)]
    param = np.arange(int(np.prod(pshape)), dtype=np.int64).reshape(pshape) * 7 + 3
    full = np.broadcast_to(param, dims)
    if channels_first and len(dims) > 1:
        full = np.moveaxis(full, 0, -1)
    vec = param.reshape(-1).astype(np.float64)
    got = flat_affine(Affine(vec, -2.0 * vec), tuple(dims), axes, channels_first)
    assert isinstance(got, Affine)
    np.testing.assert_array_equal(got.scale, full.reshape(-1))
    np.testing.assert_array_equal(got.shift, -2.0 * full.reshape(-1))
