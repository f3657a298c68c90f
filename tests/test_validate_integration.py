"""End to end on a real ONNX model: a corrupted fold is caught, blamed and rolled back.

The model is x -> Conv(4) -> BN -> Relu -> Conv(6) -> BN -> Relu -> Conv(5) -> BN -> y,
with random BN statistics. The fold math is wrapped so that exactly one fold (the one
into the 6-channel Conv, i.e. of "bn2") comes out wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_util import corrupt_backward_folds

import bnfuse
import bnfuse.fold
from bnfuse import report
from bnfuse.bench import ORT_FOLDS_NOTE
from bnfuse.errors import ValidationError

CHANNELS = (4, 6, 5)
CORRUPT_CHANNELS = 6  # the Conv that "bn2" folds into


def three_conv_bn_model(seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, cin = "x", 3
    for i, cout in enumerate(CHANNELS, start=1):
        w = (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        gamma = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        beta = rng.normal(0, 0.2, cout).astype(np.float32)
        mean = rng.normal(0, 0.5, cout).astype(np.float32)
        var = rng.uniform(0.2, 2.0, cout).astype(np.float32)
        for name, arr in (
            (f"w{i}", w),
            (f"b{i}", b),
            (f"gamma{i}", gamma),
            (f"beta{i}", beta),
            (f"mean{i}", mean),
            (f"var{i}", var),
        ):
            inits.append(numpy_helper.from_array(arr, name))
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
            )
        )
        out = "y" if i == len(CHANNELS) else f"n{i}"
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                [out],
                name=f"bn{i}",
                epsilon=1e-5,
            )
        )
        if i < len(CHANNELS):
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
        cin = cout
    graph = helper.make_graph(
        nodes,
        "three_conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS[-1], 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(three_conv_bn_model(), str(path))
    return path


@pytest.fixture
def corrupt_bn2(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the fold into the 6-channel Conv wrong by 5%; returns a log of corruptions."""
    return corrupt_backward_folds(
        monkeypatch, lambda w: w.ndim == 4 and w.shape[0] == CORRUPT_CHANNELS
    )


def run_model(model: Any, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_clean_model_folds_all_three_and_validates(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused.onnx"
    result = bnfuse.fuse(model_path, out)
    assert sorted(f.bn for f in result.folds) == ["bn1", "bn2", "bn3"]
    assert result.validation is not None and result.validation.passed
    assert result.validation.runtime.startswith("onnxruntime")
    (o,) = result.validation.outputs
    assert o.name == "y" and o.dtype == "float32" and o.max_abs_error < o.atol
    assert out.exists() and result.written


def test_corrupted_fold_is_caught_and_blamed(
    model_path: Path, tmp_path: Path, corrupt_bn2: list[int]
) -> None:
    out = tmp_path / "fused.onnx"
    with pytest.raises(ValidationError) as exc:
        bnfuse.fuse(model_path, out)
    assert corrupt_bn2, (
        "the corruption hook was never called: the backend no longer uses fold_backward"
    )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp files either
    res = exc.value.result
    assert res is not None and res.validation is not None
    assert not res.validation.passed
    assert res.validation.culprits == ("bn2",)
    assert res.validation.rolled_back == ()
    assert not res.written
    (o,) = res.validation.outputs
    assert not o.passed and o.mismatches > 0 and o.min_atol > o.atol
    assert "bn2" in str(exc.value)
    text = report.to_json(res)  # a failed result still reports cleanly
    assert json.loads(text)["validation"]["culprits"] == ["bn2"]


def test_rollback_drops_only_the_bad_fold(
    model_path: Path, tmp_path: Path, corrupt_bn2: list[int]
) -> None:
    out = tmp_path / "fused.onnx"
    result = bnfuse.fuse(model_path, out, rollback=True)
    v = result.validation
    assert v is not None and v.passed
    assert v.culprits == ("bn2",) and v.rolled_back == ("bn2",)
    assert sorted(f.bn for f in result.folds) == ["bn1", "bn3"]
    assert "bn2" in {r.bn for r in result.refusals}
    assert result.written and out.exists()
    assert result.after.bn_nodes == 1

    fused = onnx.load(str(out))
    assert [n.name for n in fused.graph.node if n.op_type == "BatchNormalization"] == ["bn2"]
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = run_model(onnx.load(str(model_path)), x)
    np.testing.assert_allclose(run_model(fused, x), ref, rtol=1e-4, atol=1e-4)

    md = report.to_markdown(result)
    assert "rolled back" in md and "`bn2`" in md


def test_force_writes_despite_failure(
    model_path: Path, tmp_path: Path, corrupt_bn2: list[int]
) -> None:
    out = tmp_path / "fused.onnx"
    result = bnfuse.fuse(model_path, out, force=True)
    assert result.validation is not None and not result.validation.passed
    assert result.validation.culprits == ("bn2",)
    assert result.written and out.exists()


def test_failed_validation_skips_the_benchmark_unless_forced(
    model_path: Path, tmp_path: Path, corrupt_bn2: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfuse.bench

    timed: list[int] = []
    real_run = bnfuse.bench.run

    def run(*args: Any, **kwargs: Any) -> Any:
        timed.append(1)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(bnfuse.bench, "run", run)
    out = tmp_path / "fused.onnx"
    with pytest.raises(ValidationError) as exc:
        bnfuse.fuse(model_path, out, bench=True, bench_seconds=0.2)
    res = exc.value.result
    assert res is not None and res.bench is None and not out.exists()
    assert timed == []  # nothing is written: the fused model is not timed either
    assert "benchmark skipped: validation failed (--force writes and times it anyway)" in (
        res.warnings
    )
    assert "benchmark skipped" in report.to_markdown(res)

    forced = bnfuse.fuse(model_path, out, bench=True, bench_seconds=0.2, force=True)
    assert forced.validation is not None and not forced.validation.passed
    assert timed == [1] and forced.bench is not None and forced.bench.rows
    assert forced.written and out.exists()
    assert not any("benchmark skipped" in w for w in forced.warnings)


def test_real_inputs_from_npz(model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((4, 3, 8, 8)))  # float64
    result = bnfuse.fuse(model_path, None, inputs=data)
    assert result.validation is not None and result.validation.passed
    assert result.validation.samples == 1  # one run of the whole batch
    assert result.validation.input_source == str(data)


def test_bench_on_a_real_model(model_path: Path) -> None:
    result = bnfuse.fuse(model_path, None, bench=True, batches=(1, 2), bench_seconds=0.4)
    b = result.bench
    assert b is not None
    assert {r.runtime for r in b.rows} >= {
        "onnxruntime ORT_DISABLE_ALL",
        "onnxruntime ORT_ENABLE_ALL",
    }
    assert {r.batch for r in b.rows} == {1, 2}
    assert all(r.original.runs >= 5 and r.fused.runs >= 5 for r in b.rows)
    assert ORT_FOLDS_NOTE in b.notes
    assert b.machine["onnxruntime"] == ort.__version__
    json.loads(report.to_json(result))


def test_original_runs_once_per_sample_then_its_session_is_released(
    model_path: Path, tmp_path: Path, corrupt_bn2: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # bisection and rollback validate many fused variants; the original is run once per
    # sample and its outputs reused (its session, another copy of the weights, is freed)
    from bnfuse.onnx import backend as onnx_backend

    runners: list[Any] = []  # in order of first run (kept alive: ids are not reused)
    real_run = onnx_backend.OrtRunner.run

    def counting_run(self: Any, feeds: Any) -> Any:
        if not any(r is self for r in runners):
            runners.append(self)
            self.test_runs = 0
        self.test_runs += 1
        return real_run(self, feeds)

    monkeypatch.setattr(onnx_backend.OrtRunner, "run", counting_run)
    result = bnfuse.fuse(model_path, tmp_path / "f.onnx", rollback=True, samples=3)
    assert result.validation is not None and result.validation.rolled_back == ("bn2",)
    counts = [r.test_runs for r in runners]
    assert counts[0] == 3  # the original: one run per sample, first
    assert len(counts) > 3 and all(c == 3 for c in counts)  # several fused variants
