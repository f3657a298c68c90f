"""Every Keras rule has the one rule shape (a pattern, a check, a plan from the planning
core, a rewrite), its ``--skip`` name is stable, and the layout math exists once: in the
planning core (bnfuse/plan.py) and bnfuse/fold.py, not in a Keras module."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

import keras

from bnfuse.fold import Affine
from bnfuse.keras import rules
from bnfuse.plan import BackwardPlan, ForwardPlan, Layout

KERAS = Path(__file__).resolve().parents[2] / "bnfuse" / "keras"

#: The rule names users pass to --skip: renaming one breaks their command lines.
NAMES = (
    "dense-bn",
    "conv-bn",
    "depthwise-bn",
    "separable-bn",
    "conv-transpose-bn",
    "bn-dense",
    "bn-flatten-dense",
    "bn-conv",
    "bn-depthwise",
    "bn-separable",
    "bn-conv-transpose",
)


def test_every_rule_has_the_one_shape_and_its_name() -> None:
    assert rules.rule_names() == NAMES
    assert rules.RULES == rules.BACKWARD_RULES + rules.FORWARD_RULES
    for rule in rules.RULES:
        for method in ("match", "check", "plan", "rewrite"):
            assert callable(getattr(rule, method)), (rule.name, method)
        assert rule.doc, rule.name
    assert all(r.direction == "backward" for r in rules.BACKWARD_RULES)
    assert all(r.direction == "forward" for r in rules.FORWARD_RULES)


def test_no_keras_module_does_the_core_s_work() -> None:
    """Channel maps, folds and the core's refusal wordings are called only by the core:
    a Keras module that builds its own is a second copy of the layout math."""
    core_only = {"channel_map", "fold_backward", "fold_forward", "PADDING", "TRANSPOSE_SHIFT"}
    for path in sorted(KERAS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not used & core_only, (path.name, sorted(used & core_only))


def _layer(cls: type, *args: object, **kw: object) -> keras.layers.Layer:
    layer = cls(*args, **kw)
    layer.build((None, 6, 6, 4) if "Dense" not in cls.__name__ else (None, 4))
    return layer


@pytest.mark.parametrize(
    ("cls", "args", "kw", "direction", "want"),
    [
        (keras.layers.Dense, (3,), {}, "backward", ((1,), (0,), 1, False, True)),
        (keras.layers.Conv2D, (6, 3), {"groups": 2}, "forward", ((-1,), (-2,), 2, False, False)),
        (keras.layers.DepthwiseConv2D, (3,), {"depth_multiplier": 2}, "forward",
         ((-2, -1), (-2,), 1, False, False)),
        (keras.layers.SeparableConv2D, (5, 3), {"depth_multiplier": 2}, "backward",
         ((-1,), (-2,), 1, False, False)),
        (keras.layers.SeparableConv2D, (5, 3), {"depth_multiplier": 2}, "forward",
         ((-2, -1), (-2,), 1, False, False)),
        (keras.layers.Conv2DTranspose, (5, 3), {}, "forward", ((-2,), (-1,), 1, True, False)),
    ],
)  # fmt: skip
def test_layers_describe_themselves_as_the_core_s_layouts(
    cls: type, args: tuple[object, ...], kw: dict[str, object], direction: str,
    want: tuple[object, ...],
) -> None:  # fmt: skip
    """The table of bnfuse/plan.py: out/in axes, groups, transposed, dense."""
    layer = _layer(cls, *args, **kw)
    rule = next(r for r in rules.RULES if r.direction == direction and r.match(layer))
    w = {v.path.split("/")[-1]: np.asarray(v.numpy(), dtype=np.float64) for v in layer.weights}
    layout = rule.kind.layout(layer, w, direction)
    assert isinstance(layout, Layout)
    got = (layout.out_axes, layout.in_axes, layout.groups, layout.transposed, layout.dense)
    assert got == want
    assert layout.shape == w[rule.kind.variable(direction)].shape


def test_separable_forward_rewrite_moves_the_shift_to_the_bias() -> None:
    """SeparableConv(BN(x)): the depthwise kernel takes the scale, the pointwise kernel
    carries the depthwise output shift into the bias (bnfuse.fold.separable_bias)."""
    layer = _layer(keras.layers.SeparableConv2D, 5, 3, depth_multiplier=2, padding="valid")
    rng = np.random.default_rng(0)
    w = {v.path.split("/")[-1]: rng.normal(size=v.shape) for v in layer.weights}
    aff = Affine(rng.uniform(0.5, 2, 4), rng.normal(size=4))
    rule = rules.rule_by_name("bn-separable")
    plan = rule.plan(layer, w, aff, in_shape=(None, 6, 6, 4))
    assert isinstance(plan, ForwardPlan)
    new = rule.rewrite(w, plan)
    dk, pk = w["depthwise_kernel"], w["pointwise_kernel"]
    np.testing.assert_allclose(new["depthwise_kernel"], dk * aff.scale[:, None])
    mid = (dk.sum(axis=(0, 1)) * aff.shift[:, None]).reshape(-1)  # per depthwise output
    np.testing.assert_allclose(new["bias"], w["bias"] + mid @ pk[0, 0])
    np.testing.assert_array_equal(new["pointwise_kernel"], pk)
    back = rules.rule_by_name("separable-bn").plan(layer, w, Affine(np.ones(5), np.ones(5)))
    assert isinstance(back, BackwardPlan)


def test_keras_refusals_of_the_core_have_its_one_wording_and_code() -> None:
    """A channel count that does not match is refused by the core, in the wording every
    backend uses, tagged axis-mismatch (Keras's own "channel count of ... differs"
    sentence is gone); the padding and transposed-shift refusals likewise."""
    from bnfuse.reasons import PADDING, TRANSPOSE_SHIFT

    conv = _layer(keras.layers.Conv2D, 6, 3, name="c", padding="same")
    w = {v.path.split("/")[-1]: np.ones(v.shape) for v in conv.weights}
    three = Affine(np.ones(3), np.ones(3))
    back = rules.rule_by_name("conv-bn").plan(conv, w, three)
    assert (back, getattr(back, "code", None)) == (
        "BatchNormalization has 3 channels but Conv2D 'c' output has 6",
        "axis-mismatch",
    )
    fwd = rules.rule_by_name("bn-conv").plan(conv, w, three, norm="Rescaling")
    assert (fwd, getattr(fwd, "code", None)) == (
        "Rescaling has 3 channels but Conv2D 'c' input has 4",
        "axis-mismatch",
    )
    four = Affine(np.ones(4), np.ones(4))
    pad = rules.rule_by_name("bn-conv").plan(conv, w, four, in_shape=(None, 6, 6, 4))
    assert (pad, getattr(pad, "code", None)) == (PADDING, "padding")
    tconv = _layer(keras.layers.Conv2DTranspose, 5, 3, name="t")
    tw = {v.path.split("/")[-1]: np.ones(v.shape) for v in tconv.weights}
    shift = rules.rule_by_name("bn-conv-transpose").plan(tconv, tw, four)
    assert (shift, getattr(shift, "code", None)) == (TRANSPOSE_SHIFT, "padding")
    dense = _layer(keras.layers.Dense, 3, name="d")
    dw = {v.path.split("/")[-1]: np.ones(v.shape) for v in dense.weights}
    flat = rules.rule_by_name("bn-flatten-dense").plan(dense, dw, three, per_feature=True)
    assert flat == "BatchNormalization gives 3 features but Dense 'd' takes 4"
