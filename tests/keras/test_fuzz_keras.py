"""Property-based fuzzing of the Keras pass on random Sequential and Functional models.

Each example is a random stack of the layers bnfuse folds: Dense (on rank 2, 3 and 4
tensors), Conv1D/Conv2D (groups), DepthwiseConv1D/2D (depth_multiplier), SeparableConv1D/2D
and Conv1DTranspose/Conv2DTranspose, with padding valid/same, strides, dilation, use_bias
and ``activation=`` drawn at random; BatchNormalization on the channel axis or on another
valid axis (positive or negative), center/scale off, random epsilon; ReLU/Activation
layers; Flatten/Reshape((-1,)) heads. Inputs are rank 2, 3 or 4, channels_last or
channels_first. TF cannot run channels_first Conv (groups=1) or transposed convolutions on
the CPU, so channels_first models use grouped Conv, depthwise and separable layers only.
Functional models also get forks: Add of two branches (residuals included), a tensor with
a second consumer, extra model outputs (BN outputs too) and a linear layer called twice.

Every weight and BN statistic is random (``keras_helpers.randomize``, never the identity
defaults; seed drawn by hypothesis); some BNs get mean = beta = 0, which reaches the
scale-only forward folds (same padding, transposed convolutions).

Properties of ``bnfuse.fuse(model, validate=False)``:

* it returns, or raises a documented :class:`~bnfuse.errors.BnfuseError` (never a
  :class:`~bnfuse.errors.FusionInvariantError`, which bnfuse itself calls a bug);
* the original model is unchanged (weights and config);
* the fused model's outputs (``model(x, training=False)``) equal the original's;
* every BN is either folded or refused; folded ones are gone, refused ones remain, and
  layers no fold touched keep their weights (``check_untouched``);
* a BN right after a linear layer with a linear activation, on that layer's channel axis,
  whose output feeds only the BN and is no model output, and which is called once, is
  always folded backward into that layer (``must_fold``).

``BNFUSE_KERAS_FUZZ_EXAMPLES`` raises the number of examples for a longer local run.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

pytest.importorskip("tensorflow")

import keras
from keras import layers as L
from keras_helpers import (
    bn_names,
    check_untouched,
    randomize,
    run,
    sample_inputs,
    weights_snapshot,
)

import bnfuse
from bnfuse.errors import BnfuseError, FusionInvariantError

pytestmark = pytest.mark.keras

CF = "channels_first"
CL = "channels_last"
RTOL = 1e-4  # float32 through a few layers; compared in float64

FUZZ = settings(
    max_examples=int(os.environ.get("BNFUSE_KERAS_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


@dataclass
class Case:
    model: keras.Model
    must_fold: dict[str, str]  # BN name -> the linear layer it must fold backward into
    seed: int
    steps: list[str] = field(default_factory=list)


class _Gen:
    """Draws layers onto a symbolic tensor, tracking what ``must_fold`` needs."""

    def __init__(self, draw: st.DrawFn, functional: bool, fmt: str) -> None:
        self.draw = draw
        self.functional = functional
        self.fmt = fmt
        self.n = 0
        self.keep: list[Any] = []  # every tensor stays alive, so ids stay unique
        self.uses: Counter[int] = Counter()  # tensor id -> number of layer calls taking it
        self.calls: Counter[str] = Counter()  # layer name -> number of calls
        self.linear_out: dict[int, tuple[str, int]] = {}  # tensor id -> (layer, channel axis)
        self.candidates: list[tuple[str, str, Any]] = []  # (bn, linear layer, its output)
        self.outputs: list[Any] = []
        self.chain: list[Any] = []  # layers in call order (the Sequential model)
        self.zero_shift: list[str] = []
        self.steps: list[str] = []
        self.bns = 0

    # -- helpers ---------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def pick(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    def call(self, layer: Any, *xs: Any) -> Any:
        for x in xs:
            self.uses[id(x)] += 1
        self.calls[layer.name] += 1
        y = layer(xs[0] if len(xs) == 1 else list(xs))
        self.keep.append(y)
        self.chain.append(layer)
        cfg = layer.get_config()
        shown = {
            k: cfg[k]
            for k in (
                "units",
                "filters",
                "kernel_size",
                "strides",
                "padding",
                "dilation_rate",
                "groups",
                "depth_multiplier",
                "data_format",
                "activation",
                "use_bias",
                "axis",
                "center",
                "scale",
                "epsilon",
            )
            if k in cfg
        }
        self.steps.append(f"{type(layer).__name__} {layer.name} {shown} -> {tuple(y.shape)}")
        return y

    def channel_axis(self, y: Any) -> int:
        rank = len(y.shape)
        return 1 if rank > 2 and self.fmt == CF else rank - 1

    def spatial(self, y: Any) -> list[int]:
        shape = [int(d) for d in y.shape[1:]]
        return shape[1:] if self.fmt == CF else shape[:-1]

    def channels(self, y: Any) -> int:
        return int(y.shape[self.channel_axis(y)])

    # -- layers ----------------------------------------------------------------------

    def bn(self, y: Any) -> Any:
        rank = len(y.shape)
        ch = self.channel_axis(y)
        axis = ch if self.pick([True, True, True, False]) else self.pick(list(range(1, rank)))
        if self.pick([True, False]):
            axis -= rank  # the same axis, counted from the end
        name = self.name("bn")
        layer = L.BatchNormalization(
            axis=axis,
            center=self.pick([True, True, False]),
            scale=self.pick([True, True, False]),
            epsilon=self.pick([1e-3, 1e-5, 0.1, 0.7]),
            name=name,
        )
        if self.pick([False, False, False, True]):
            self.zero_shift.append(name)
        made = self.linear_out.get(id(y))
        if made is not None and axis % rank == made[1]:
            self.candidates.append((name, made[0], y))
        self.bns += 1
        return self.call(layer, y)

    def act(self, y: Any) -> Any:
        kind = self.pick(["relu", "tanh", "linear"])
        if kind == "relu":
            return self.call(L.ReLU(name=self.name("relu")), y)
        return self.call(L.Activation(kind, name=self.name(kind)), y)

    def _linear_layer(self, y: Any, preserve: bool = False) -> Any:
        """A random linear layer for input ``y``; ``preserve`` keeps the output shape."""
        rank = len(y.shape)
        cin = self.channels(y)
        kinds = []  # hypothesis leans to the first option: convolutions before Dense
        if rank >= 3:
            if self.fmt == CL or cin >= 2:
                kinds.append("conv")
            if self.fmt == CL and max(self.spatial(y)) <= 6:
                kinds.append("transpose")
            kinds += ["depthwise", "separable"]
        kind = self.pick([*kinds, "dense"])
        common: dict[str, Any] = {
            "use_bias": self.pick([True, False]),
            "activation": self.pick([None, None, None, "linear", "relu"]),
        }
        if kind == "dense":
            units = int(y.shape[-1]) if preserve else self.draw(st.integers(1, 6))
            return L.Dense(units, name=self.name("dense"), **common)
        spatial = self.spatial(y)
        nd = len(spatial)
        padding = "same" if preserve else self.pick(["valid", "same"])
        strides = 1 if preserve or kind == "transpose" else self.pick([1, 1, 2])
        if kind == "transpose":
            strides = 1 if preserve else self.pick([1, 2])
        dilation = 1
        if strides == 1 and kind != "transpose" and self.pick([False, False, True]):
            dilation = 2
        ksize = []
        for size in spatial:
            ks = [k for k in (1, 2, 3) if padding == "same" or (k - 1) * dilation + 1 <= size]
            ksize.append(self.pick(ks))
        common.update(
            kernel_size=tuple(ksize), strides=strides, padding=padding, data_format=self.fmt
        )
        if kind != "transpose":
            common["dilation_rate"] = dilation
        if kind == "conv":
            groups = self.pick([g for g in range(1, cin + 1) if cin % g == 0])
            if self.fmt == CF and groups == 1:  # TF CPU runs channels_first Conv only grouped
                groups = cin
            filters = cin if preserve else groups * self.draw(st.integers(1, 3))
            cls = L.Conv1D if nd == 1 else L.Conv2D
            return cls(filters, groups=groups, name=self.name("conv"), **common)
        if kind == "depthwise":
            mult = 1 if preserve else self.draw(st.integers(1, 3))
            cls = L.DepthwiseConv1D if nd == 1 else L.DepthwiseConv2D
            return cls(depth_multiplier=mult, name=self.name("dw"), **common)
        if kind == "separable":
            filters = cin if preserve else self.draw(st.integers(1, 5))
            cls = L.SeparableConv1D if nd == 1 else L.SeparableConv2D
            mult = self.draw(st.integers(1, 2))
            return cls(filters, depth_multiplier=mult, name=self.name("sep"), **common)
        filters = cin if preserve else self.draw(st.integers(1, 4))
        cls = L.Conv1DTranspose if nd == 1 else L.Conv2DTranspose
        return cls(filters, name=self.name("convT"), **common)

    def linear_layer(self, y: Any, preserve: bool = False) -> Any:
        layer = self._linear_layer(y, preserve)
        out = layer.compute_output_shape(tuple(y.shape))
        if self.fmt == CF and len(out) > 2 and out[1] == out[-1]:
            # Keras bug (TF backend, keras 3.15): ``ops.add(x, bias.reshape(1, C, 1..))``
            # takes a ``tf.nn.bias_add`` shortcut and adds along the LAST axis when it has
            # length C too, so a channels_first conv whose channel count equals its last
            # spatial size computes the wrong bias (the original model is wrong, and a fold
            # changes that bias). Dense adds along the last axis, which is right.
            units = int(y.shape[-1]) if preserve else self.draw(st.integers(1, 6))
            cfg = layer.get_config()
            layer = L.Dense(
                units,
                use_bias=cfg["use_bias"],
                activation=cfg["activation"],
                name=self.name("dense"),
            )
        return layer

    def linear(self, y: Any, preserve: bool = False, layer: Any = None) -> Any:
        layer = layer or self.linear_layer(y, preserve)
        event(f"layer {type(layer).__name__}")
        out = self.call(layer, y)
        act = layer.get_config().get("activation")
        if act in (None, "linear"):
            ch = len(out.shape) - 1 if isinstance(layer, L.Dense) else self.channel_axis(out)
            self.linear_out[id(out)] = (layer.name, ch)
        return out

    def flatten(self, y: Any) -> Any:
        if self.pick([True, True, False]):
            return self.call(L.Flatten(data_format=self.fmt, name=self.name("flat")), y)
        return self.call(L.Reshape((-1,), name=self.name("reshape")), y)

    # -- blocks ----------------------------------------------------------------------

    def block(self, y: Any) -> Any:
        ops = ["lin_bn", "act_bn_lin", "lin_bn", "act_bn_lin", "lin", "bn", "act"]
        if len(y.shape) >= 3:
            ops.append("flatten")
        if self.functional:
            ops += ["fork_add", "fork_add", "side_output", "side_consumer", "shared"]
        op = self.pick(ops)
        if op == "lin_bn":
            return self.bn(self.linear(y))
        if op == "act_bn_lin":  # a BN with no linear layer before it: forward folds
            return self.linear(self.bn(self.act(y)))
        if op == "lin":
            return self.linear(y)
        if op == "bn":
            return self.bn(y)
        if op == "act":
            return self.act(y)
        if op == "flatten":
            return self.flatten(y)
        if op == "fork_add":
            a, b = self.branch(y), self.branch(y)
            if a is y and b is y:
                b = self.bn(y)
            return self.call(L.Add(name=self.name("add")), a, b)
        if op == "side_output":  # a model output in the middle (often a BN output)
            made = any(t is y for t in self.keep)  # not the model input
            if made and all(o is not y for o in self.outputs):
                self.outputs.append(y)
            return y
        if op == "side_consumer":  # a second consumer of y, ending in a model output
            self.outputs.append(self.act(y))
            return y
        # one linear layer called twice (shared weights), then Add
        layer = self.linear_layer(y, preserve=True)
        a = self.linear(y, layer=layer)
        if self.pick([True, False]):
            a = self.bn(a)
        b = self.linear(self.act(y), layer=layer)
        return self.call(L.Add(name=self.name("add")), a, b)

    def branch(self, y: Any) -> Any:
        kind = self.pick(["lin_bn", "identity", "bn", "act", "lin", "lin_bn"])
        if kind == "identity":
            return y
        if kind == "bn":
            return self.bn(y)
        if kind == "act":
            return self.act(y)
        out = self.linear(y, preserve=True)
        return self.bn(out) if kind == "lin_bn" else out

    def head(self, y: Any) -> Any:
        head = self.pick(["none", "dense_bn", "bn_flatten_dense", "bn_dense"])
        if head == "none":
            return y
        if head == "bn_flatten_dense":
            y = self.bn(y)
            if len(y.shape) >= 3:
                y = self.flatten(y)
            return self.linear(y, layer=L.Dense(self.draw(st.integers(1, 4)), name="head"))
        if head == "bn_dense":
            y = self.bn(y)
            return self.linear(y, layer=L.Dense(self.draw(st.integers(1, 4)), name="head"))
        if len(y.shape) >= 3 and self.pick([True, False]):
            y = self.flatten(y)
        y = self.linear(y, layer=L.Dense(self.draw(st.integers(1, 4)), name="head"))
        return self.bn(y)


def build_case(draw: st.DrawFn, functional: bool) -> Case:
    """A random model (built here, in the test body: Keras draws its own seeds from
    ``random`` while building, which hypothesis forbids inside strategies)."""
    keras.backend.clear_session(free_memory=False)  # gc.collect() would cost ~0.3 s
    rank = draw(st.sampled_from([4, 3, 4, 3, 2]))
    fmt = draw(st.sampled_from([CL, CL, CF])) if rank > 2 else CL
    g = _Gen(draw, functional, fmt)
    c = draw(st.integers(1, 5))
    if rank == 2:
        shape: tuple[int, ...] = (c,)
    else:
        spatial = tuple(draw(st.integers(3, 8)) for _ in range(rank - 2))
        shape = (c, *spatial) if fmt == CF else (*spatial, c)
    event(f"input rank {rank}" + (f" {fmt}" if rank > 2 else ""))
    x = keras.Input(shape, name="x")
    y = x
    for _ in range(draw(st.integers(1, 5))):
        y = g.block(y)
    y = g.head(y)
    if g.bns == 0:
        y = g.bn(g.linear(y))
    if y is x:
        y = g.act(y)
    outputs = [o for o in g.outputs if o is not y] + [y]
    if functional:
        model = keras.Model(x, outputs if len(outputs) > 1 else y, name="fn")
    else:
        layers = [type(layer).from_config(layer.get_config()) for layer in g.chain]
        model = keras.Sequential([keras.Input(shape, name="x"), *layers], name="seq")
    must_fold = {
        bn: lin
        for bn, lin, t in g.candidates
        if g.calls[lin] == 1 and g.uses[id(t)] == 1 and all(o is not t for o in outputs)
    }
    seed = draw(st.integers(0, 2**16))
    randomize(model, seed=seed, zero_shift=g.zero_shift)
    return Case(model, must_fold, seed, g.steps)


def _check(case: Case) -> None:
    model = case.model
    note("\n".join(case.steps))
    note(f"must fold: {case.must_fold}; seed {case.seed}")
    xs = sample_inputs(model, batch=2, seed=case.seed)
    ref = run(model, xs)
    before_w = weights_snapshot(model)
    before_cfg = copy.deepcopy(model.get_config())
    try:
        res = bnfuse.fuse(model, validate=False)
    except FusionInvariantError:
        raise  # documented, but bnfuse's own word for a bug
    except BnfuseError as exc:
        event(f"documented error: {type(exc).__name__}")
        return
    note(f"folds: {[(f.bn, f.into, f.rule) for f in res.folds]}")
    note(f"refusals: {[(r.bn, r.reason) for r in res.refusals]}")
    event(f"folded {len(res.folds)} of {len(res.folds) + len(res.refusals)} BNs")
    for f in res.folds:
        event(f"rule {f.rule}")
    if case.must_fold:
        event("has a BN that must fold")

    # the original is untouched
    after_w = weights_snapshot(model)
    assert before_w.keys() == after_w.keys()
    assert all(np.array_equal(before_w[k], after_w[k]) for k in before_w)
    assert model.get_config() == before_cfg

    # same outputs, float64 comparison of float32 runs
    got = run(res.model, xs)
    assert len(got) == len(ref)
    for i, (r, y) in enumerate(zip(ref, got, strict=True)):
        assert r.shape == y.shape, (i, r.shape, y.shape)
        scale = max(float(np.max(np.abs(r))), 1e-6)
        err = np.abs(y - r)
        bad = err > RTOL * np.abs(r) + RTOL * scale
        assert not bad.any(), f"output {i}: max abs error {err.max():.3g}, max |ref| {scale:.3g}"

    # every BN folded or refused; folded ones gone, refused ones kept
    folded = {f.bn: f for f in res.folds}
    refused = {r.bn for r in res.refusals}
    assert not folded.keys() & refused
    assert folded.keys() | refused == bn_names(model)
    assert bn_names(res.model) == refused
    assert len(res.refusals) == len(refused)
    check_untouched(model, res)

    # a BN right after a single-consumer linear layer always folds into it
    for bn, lin in case.must_fold.items():
        assert bn in folded, [r.reason for r in res.refusals if r.bn == bn]
        assert (folded[bn].into, folded[bn].direction) == (lin, "backward"), folded[bn]


@FUZZ
@given(st.data())
def test_random_sequential_models(data: st.DataObject) -> None:
    _check(build_case(data.draw, functional=False))


@FUZZ
@given(st.data())
def test_random_functional_models(data: st.DataObject) -> None:
    _check(build_case(data.draw, functional=True))
