"""float16 arithmetic behind float32 inputs and outputs (what onnxconverter-common's
``convert_float_to_float16(keep_io_types=True)`` writes): validation judges the float32
output by float16's tolerance, since both the original and the fused model round in float16,
and still catches a wrong fold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_util import corrupt_backward_folds

import bnfuse
from bnfuse.errors import ValidationError
from bnfuse.onnx.backend import OrtRunner


def keep_io_model(dtype: Any = np.float16, seed: int = 0) -> onnx.ModelProto:
    """Cast -> Conv -> BN -> Relu -> Flatten -> Gemm -> Cast, weights in ``dtype``."""
    r = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def t(name: str, arr: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(arr.astype(dtype), name)

    inits = [
        t("w", r.normal(0, 0.3, (8, 3, 3, 3))),
        t("b", r.normal(0, 0.3, 8)),
        t("s", r.uniform(0.5, 2.0, 8) * r.choice([-1, 1], 8)),
        t("beta", r.normal(0, 1, 8)),
        t("mean", r.normal(0, 1, 8)),
        t("var", r.uniform(0.2, 3.0, 8)),
        t("fw", r.normal(0, 0.3, (10, 8 * 14 * 14))),
        t("fb", r.normal(0, 0.3, 10)),
    ]
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=elem),
        helper.make_node("Conv", ["xh", "w", "b"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], transB=1),
        helper.make_node("Cast", ["g"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "keep_io",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_runner_reports_the_coarsest_compute_dtype() -> None:
    assert OrtRunner(keep_io_model()).compute_dtype == "float16"
    assert OrtRunner(keep_io_model(np.float32)).compute_dtype == "float32"


def test_float16_inside_float32_io_folds_and_validates(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(keep_io_model(), str(src))
    res = bnfuse.fuse(src, out)  # failed before: float32 tolerance on float16 rounding
    assert [f.bn for f in res.folds] == ["bn"] and res.written
    assert res.validation is not None and res.validation.passed
    (o,) = res.validation.outputs
    assert o.dtype == "float32" and o.rtol == 1e-2
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]


def test_a_wrong_fold_still_fails_under_float16_tolerance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(keep_io_model(), str(src))
    hits = corrupt_backward_folds(monkeypatch, lambda w: w.shape[0] == 8)
    with pytest.raises(ValidationError):
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert hits and not (tmp_path / "f.onnx").exists()
