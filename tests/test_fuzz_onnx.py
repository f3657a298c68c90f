"""Property-based fuzzing of the ONNX pass on random graphs, and a mutation fuzz of
serialized models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_util import GraphBuilder, assert_close, count_ops

import bnfuse
from bnfuse.backend import FuseOptions
from bnfuse.errors import BnfuseError, FusionInvariantError
from bnfuse.onnx.backend import OnnxBackend

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[onnx.ModelProto, list[str]]:
    """A random graph; also returns the BN names that must fold (right after a
    single-consumer Conv with constant parameters)."""
    b = GraphBuilder(seed=draw(st.integers(0, 2**16)))
    c = draw(st.integers(1, 4)) * 2
    hw = draw(st.integers(6, 9))
    y = b.input("x", [2, c, hw, hw])
    must_fold: list[str] = []
    last_w: dict[tuple[int, ...], str] = {}
    spatial = hw
    for _ in range(draw(st.integers(1, 6))):
        op = draw(
            st.sampled_from(
                ["conv", "conv_bn", "convT_bn", "bn", "relu", "affine", "branch", "out"]
            )
        )
        if op in ("conv", "conv_bn") and spatial >= 3:
            groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
            cout = groups * draw(st.integers(1, 3))
            pad = draw(st.sampled_from([0, 1]))
            shape = (cout, c // groups, 3, 3)
            w = last_w.get(shape) if draw(st.booleans()) else None  # shared weight
            w = w or b.weight(shape)
            last_w[shape] = w
            ins = [y, w] + (
                [b.const(b.r.normal(0, 1, cout).astype(np.float32))] if draw(st.booleans()) else []
            )
            y = b.node("Conv", ins, group=groups, pads=[pad] * 4)
            c, spatial = cout, spatial - 2 + 2 * pad
            if op == "conv_bn":
                name = b.name("bn")
                y = b.bn(y, c, name=name, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])))
                must_fold.append(name)
        elif op == "convT_bn":
            groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0]))
            cout = groups * draw(st.integers(1, 2))
            y = b.node("ConvTranspose", [y, b.weight((c, cout // groups, 2, 2))], group=groups)
            c, spatial = cout, spatial + 1
            name = b.name("bn")
            y = b.bn(y, c, name=name)
            must_fold.append(name)
        elif op == "bn":
            y = b.bn(y, c)
        elif op == "relu":
            y = b.node("Relu", [y])
        elif op == "affine":
            shape = draw(st.sampled_from([(), (c, 1, 1), (1, c, 1, 1)]))
            y = b.node(
                draw(st.sampled_from(["Mul", "Add"])),
                [y, b.const(b.r.uniform(0.5, 2, shape).astype(np.float32))],
            )
        elif op == "branch":
            y1 = b.bn(y, c)
            y2 = b.node("Relu", [y])
            y = b.node("Add", [y1, y2])
        elif op == "out" and y != "x" and y not in {o.name for o in b.outputs}:
            b.output(y)  # a graph output in the middle
    head = draw(st.sampled_from(["none", "gemm_bn", "matmul_bn", "bn_gemm"]))
    if head != "none":
        y = b.node("Flatten", [y])
        k = c * spatial * spatial
        n = draw(st.integers(1, 5))
        if head == "gemm_bn":
            tb = draw(st.integers(0, 1))
            y = b.node("Gemm", [y, b.weight((n, k) if tb else (k, n))], transB=tb, alpha=0.5)
            y = b.bn(y, n)
        elif head == "matmul_bn":
            y = b.node("MatMul", [y, b.weight((k, n))])
            y = b.node("Add", [y, b.const(b.r.normal(0, 1, n).astype(np.float32))])
            y = b.bn(y, n)
        else:
            y = b.bn(y, k)
            y = b.node("Gemm", [y, b.weight((k, n))])
    if y == "x":
        y = b.node("Relu", [y])
    if y not in {o.name for o in b.outputs}:
        b.output(y)
    return b.model(), must_fold


@FUZZ
@given(graphs())
def test_random_graphs(case: tuple[onnx.ModelProto, list[str]]) -> None:
    model, must_fold = case
    onnx.checker.check_model(model, full_check=True)
    try:
        res = OnnxBackend().fuse(model, FuseOptions())
    except FusionInvariantError:
        raise  # documented, but bnfuse's own word for a bug
    except BnfuseError:
        return
    onnx.checker.check_model(res.model, full_check=True)
    assert_close(model, res.model, rtol=1e-3, atol=1e-4)
    folded = {f.bn for f in res.folds}
    for name in must_fold:
        assert name in folded, [r for r in res.refusals if r.bn == name]
    assert count_ops(res.model, "BatchNormalization") == len(res.refusals) - sum(
        r.kind != "BatchNormalization" for r in res.refusals
    )


def _seed_model() -> bytes:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4)
    y = b.node("Flatten", [b.node("Relu", [y])])
    y = b.node("Gemm", [y, b.weight((64, 3))])
    b.output(b.bn(y, 3))
    return b.model().SerializeToString()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_bytes_only_documented_errors(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    raw = bytearray(_seed_model())
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path_factory.mktemp("mut") / "m.onnx"
    path.write_bytes(bytes(raw))
    try:
        bnfuse.fuse(path, samples=1)
    except FusionInvariantError:
        raise  # documented, but bnfuse's own word for a bug: a damaged file is a load error
    except BnfuseError:
        pass
