"""Helpers shared by the Keras backend tests: randomized weights, fuse-and-compare.

Every BN gets random statistics (never the defaults mean 0, var 1, gamma 1, beta 0, under
which a wrong fold would still pass) and every kernel/bias random values.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bnfuse.backend import FuseOptions, PassResult
from bnfuse.keras.backend import KerasBackend
from bnfuse.keras.compat import flavor_of

BACKEND = KerasBackend()


def randomize(
    model: Any, seed: int = 0, *, zero_shift: Iterable[str] = (), gentle: bool = False
) -> Any:
    """Give every variable of ``model`` random values (in place) and return the model.

    BN layers named in ``zero_shift`` get mean = beta = 0 (their shift t is exactly 0).
    ``gentle`` keeps BN scales near 1 (deep networks) and leaves kernels as initialized.
    """
    rng = np.random.default_rng(seed)
    zero = set(zero_shift)
    fl = flavor_of(model)  # Keras 3 or Keras 2 (tf_keras): the same harness
    for layer in model._flatten_layers(include_self=False):
        is_bn = fl.is_bn(layer)
        for v in layer.weights:
            shape = tuple(v.shape)
            name = fl.var_name(v, layer)
            if is_bn:
                if name == "moving_variance":
                    val = rng.uniform(0.5, 1.5, shape) if gentle else rng.uniform(0.2, 3.0, shape)
                elif name == "gamma":
                    if gentle:
                        val = rng.uniform(0.8, 1.2, shape)
                    else:
                        val = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
                elif name in ("moving_mean", "beta"):
                    val = (
                        np.zeros(shape)
                        if layer.name in zero
                        else rng.normal(0, 0.2 if gentle else 1.0, shape)
                    )
                else:
                    continue
            elif gentle and "kernel" in name:
                continue
            elif "kernel" in name:
                val = rng.normal(0, 0.5, shape)
            elif name == "bias":
                val = rng.normal(0, 0.5 if not gentle else 0.05, shape)
            else:
                continue
            v.assign(val.astype(fl.dtype(v)))
    return model


def sample_inputs(model: Any, batch: int = 3, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    fl = flavor_of(model)
    out = []
    for t in model.inputs:
        shape = (batch, *[int(d) for d in t.shape[1:]])
        out.append(rng.normal(0, 1, shape).astype(fl.dtype(t)))
    return out


def run(model: Any, xs: list[np.ndarray]) -> list[np.ndarray]:
    """``model(x, training=False)`` as a flat list of float64 arrays."""
    x = xs[0] if len(xs) == 1 else xs
    out = model(x, training=False)
    fl = flavor_of(model)
    return [np.asarray(fl.to_numpy(o), dtype=np.float64) for o in fl.flatten(out)]


def assert_same_outputs(a: Any, b: Any, xs: list[np.ndarray], rtol: float = 1e-5) -> None:
    """Outputs agree to ``rtol`` relative to each output's largest magnitude."""
    ra, rb = run(a, xs), run(b, xs)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x.shape == y.shape
        scale = max(float(np.max(np.abs(x))), 1e-6)
        err = float(np.max(np.abs(x - y)))
        assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


def weights_snapshot(model: Any) -> dict[str, np.ndarray]:
    fl = flavor_of(model)
    return {getattr(v, "path", v.name): np.array(fl.to_numpy(v)) for v in model.weights}


def bn_names(model: Any) -> set[str]:
    fl = flavor_of(model)
    return {layer.name for layer in model._flatten_layers(include_self=False) if fl.is_bn(layer)}


def fuse(model: Any, **opts: Any) -> PassResult:
    return BACKEND.fuse(model, FuseOptions(**opts))


def check_fused(
    model: Any,
    *,
    folds: Mapping[str, tuple[str, str, str]] | None = None,
    refusals: Mapping[str, str] | None = None,
    rtol: float = 1e-5,
    options: Mapping[str, Any] | None = None,
    xs: list[np.ndarray] | None = None,
    compare: bool = True,
) -> PassResult:
    """Fuse ``model`` and check everything a fold promises.

    ``folds`` maps BN name -> (into, rule, direction); ``refusals`` BN name -> exact
    reason. Every BN must be in one of the two. The input model is not mutated, the
    folded BNs are gone, the refused ones remain, outputs agree.
    """
    folds = dict(folds or {})
    refusals = dict(refusals or {})
    before_w = weights_snapshot(model)
    before_cfg = copy.deepcopy(model.get_config())
    res = fuse(model, **dict(options or {}))
    got_folds = {f.bn: (f.into, f.rule, f.direction) for f in res.folds}
    got_refusals = {r.bn: r.reason for r in res.refusals}
    assert got_folds == folds, (got_folds, got_refusals)
    assert got_refusals == refusals, got_refusals
    # refused BNs remain (refused Normalization/Rescaling layers: checked by their tests)
    assert bn_names(res.model) == {r.bn for r in res.refusals if r.kind == "BatchNormalization"}
    assert res.model is not model
    after_w = weights_snapshot(model)
    assert before_w.keys() == after_w.keys()
    assert all(np.array_equal(before_w[k], after_w[k]) for k in before_w)
    assert model.get_config() == before_cfg
    check_untouched(model, res)
    if compare:
        assert_same_outputs(model, res.model, xs or sample_inputs(model), rtol=rtol)
    return res


def _leaves(model: Any, path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in model.layers:
        key = f"{path}/{layer.name}" if path else layer.name
        if type(layer).__name__ in ("Functional", "Sequential"):
            out.update(_leaves(layer, key))
        else:
            out[key] = layer
    return out


def check_untouched(model: Any, res: PassResult) -> None:
    """Names, dtype policies and the weights of every layer no fold touched are unchanged."""
    old, new = _leaves(model), _leaves(res.model)
    folded = {f"{f.scope}/{f.bn}" if f.scope else f.bn for f in res.folds}
    into = {f"{f.scope}/{n}" if f.scope else n for f in res.folds for n in f.into.split(", ")}
    kept_output = {k for k in folded if k in new}  # BN model outputs: an Identity now
    assert set(new) == set(old) - folded | kept_output
    for key, layer in new.items():
        assert layer.dtype_policy.name == old[key].dtype_policy.name, key
        if key in into or key in kept_output:
            continue
        a, b = old[key].get_weights(), layer.get_weights()
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), (
            key
        )
    r0, r1 = BACKEND.runner(model), BACKEND.runner(res.model)
    assert [(s.name, s.shape, s.dtype) for s in r1.inputs] == [
        (s.name, s.shape, s.dtype) for s in r0.inputs
    ]
    assert list(r1.output_names) == list(r0.output_names)
