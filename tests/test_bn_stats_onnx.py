"""--check-stats / --recalibrate on ONNX models whose BN statistics are set from data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfuse
from bnfuse.cli import app
from bnfuse.errors import UsageError
from bnfuse.onnx.backend import OnnxBackend
from bnfuse.onnx.stats import OnnxCollector

runner = CliRunner()
EPS = 1e-5
Stats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # gamma, beta, mean, var


class Net:
    """x [N,3,4,4] -> Conv1x1 -> BN1 -> Relu -> Conv1x1 -> BN2 -> y, with a numpy twin."""

    def __init__(self, seed: int = 0) -> None:
        r = np.random.default_rng(seed)
        self.w1 = r.normal(0, 1, (4, 3, 1, 1)).astype(np.float32)
        self.b1 = r.normal(2, 1, 4).astype(np.float32)
        self.w2 = r.normal(0, 1, (5, 4, 1, 1)).astype(np.float32)
        self.b2 = r.normal(0, 1, 5).astype(np.float32)
        self.g1, self.be1 = r.uniform(0.5, 2, 4), r.normal(0, 1, 4)
        self.g2, self.be2 = r.uniform(0.5, 2, 5), r.normal(0, 1, 5)

    @staticmethod
    def _conv(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x) + b[:, None, None]

    def exact_stats(self, x: np.ndarray) -> tuple[Stats, Stats]:
        """Population statistics of each BN's input, computed in numpy, upstream first."""
        c1 = self._conv(self.w1, self.b1, x.astype(np.float64))
        m1, v1 = c1.mean((0, 2, 3)), c1.var((0, 2, 3))
        s1 = (self.g1 / np.sqrt(v1 + EPS))[:, None, None]
        n1 = s1 * (c1 - m1[:, None, None]) + self.be1[:, None, None]
        c2 = self._conv(self.w2, self.b2, np.maximum(n1, 0))
        m2, v2 = c2.mean((0, 2, 3)), c2.var((0, 2, 3))
        return (self.g1, self.be1, m1, v1), (self.g2, self.be2, m2, v2)

    def stale_stats(self, x: np.ndarray, steps: int = 5) -> tuple[Stats, Stats]:
        """Moving averages after a few momentum-0.99 updates from (mean 0, var 1)."""
        (g1, be1, m1, v1), (g2, be2, m2, v2) = self.exact_stats(x)
        k = 1 - 0.99**steps
        return (g1, be1, k * m1, 1 - k + k * v1), (g2, be2, k * m2, 1 - k + k * v2)

    def model(self, st1: Stats, st2: Stats) -> onnx.ModelProto:
        arrays = {"W1": self.w1, "B1": self.b1, "W2": self.w2, "B2": self.b2}
        for i, st in ((1, st1), (2, st2)):
            for key, a in zip(("g", "be", "m", "v"), st, strict=True):
                arrays[f"{key}{i}"] = np.asarray(a, np.float32)
        inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
        nodes = [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
            helper.make_node(
                "BatchNormalization",
                ["c1", "g1", "be1", "m1", "v1"],
                ["n1"],
                name="bn1",
                epsilon=EPS,
            ),
            helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2"),
            helper.make_node(
                "BatchNormalization",
                ["c2", "g2", "be2", "m2", "v2"],
                ["y"],
                name="bn2",
                epsilon=EPS,
            ),
        ]
        graph = helper.make_graph(
            nodes,
            "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def data(n: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, (n, 3, 4, 4)).astype(np.float32)


def run(path: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(path) if isinstance(path, Path) else path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    net, x = Net(), data()
    out = {}
    for kind, stats in (("exact", net.exact_stats(x)), ("stale", net.stale_stats(x))):
        out[kind] = tmp_path / f"{kind}.onnx"
        onnx.save(net.model(*stats), out[kind])
    out["data"] = tmp_path / "x.npz"
    np.savez(out["data"], x=x)
    return out


def by_name(res: Any) -> dict[str, Any]:
    return {s.bn: s for s in res.bn_stats}


def test_statistics_set_from_the_data_are_ok(files: dict[str, Path]) -> None:
    res = bnfuse.fuse(files["exact"], check_stats=True, inputs=files["data"])
    stats = by_name(res)
    assert set(stats) == {"bn1", "bn2"}
    for s in stats.values():
        assert s.flag == "ok", s
        assert s.mean_shift < 1e-5 and s.var_ratio < 1 + 1e-5
        assert s.samples == 24 * 16 and s.channels == s.bn.count("1") * 4 + s.bn.count("2") * 5
    assert not any("flagged" in w for w in res.warnings)
    assert all(f.widening is not None and f.scale_spread is not None for f in res.folds)


def test_stale_statistics_are_flagged_worst_first(files: dict[str, Path]) -> None:
    res = bnfuse.fuse(files["stale"], check_stats=True, inputs=files["data"])
    assert [s.flag for s in res.bn_stats] == ["drift", "drift"]
    scores = [(s.mean_shift or 0) + np.log(s.var_ratio or 1) for s in res.bn_stats]
    assert scores == sorted(scores, reverse=True) and min(scores) > 1
    assert any(w.startswith("BN statistics flagged") for w in res.warnings)
    # without data the weights alone look fine: only the data show the drift
    res = bnfuse.fuse(files["stale"], check_stats=True)
    assert {s.flag for s in res.bn_stats} == {"ok"}
    assert all(s.mean_shift is None and s.samples == 0 for s in res.bn_stats)


def test_never_updated_bn_is_flagged_with_and_without_data(tmp_path: Path) -> None:
    net, x = Net(), data()
    exact1, _ = net.exact_stats(x)
    fresh = (np.ones(5), np.zeros(5), np.zeros(5), np.ones(5))
    path = tmp_path / "fresh.onnx"
    onnx.save(net.model(exact1, fresh), path)
    np.savez(tmp_path / "x.npz", x=x)
    for inputs in (None, tmp_path / "x.npz"):
        stats = by_name(bnfuse.fuse(path, check_stats=True, inputs=inputs))
        assert stats["bn2"].flag == "default" and "never updated" in stats["bn2"].note
        assert stats["bn1"].flag == "ok"
        assert (stats["bn2"].mean_shift is None) == (inputs is None)


def test_recalibrate_gives_the_exactly_set_model(files: dict[str, Path], tmp_path: Path) -> None:
    before = hashlib.sha256(files["stale"].read_bytes()).hexdigest()
    out = tmp_path / "recal.onnx"
    res = bnfuse.fuse(files["stale"], out, recalibrate=True, inputs=files["data"])
    assert hashlib.sha256(files["stale"].read_bytes()).hexdigest() == before
    x = data()
    want = run(files["exact"], x)
    got = run(out, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert len(res.folds) == 2 and res.validation is not None and res.validation.passed
    rec = res.recalibration
    assert rec is not None and rec.bns == ("bn1", "bn2") and rec.waves == 2 and rec.runs == 1
    stale = run(files["stale"], x)
    (shift,) = rec.outputs
    assert shift.max_abs == pytest.approx(float(np.abs(stale - got).max()), rel=1e-3)
    assert all(s.recalibrated and s.flag == "drift" for s in res.bn_stats)
    # the in-memory recalibrated model: validation compared it with the fused one
    assert res.validation.outputs[0].max_abs_error < 1e-4 * np.abs(want).max()


def test_recalibrated_statistics_equal_population_statistics(files: dict[str, Path]) -> None:
    backend = OnnxBackend()
    model = backend.load(files["stale"])
    col = OnnxCollector(model)
    x = data()
    (_, _, m1, v1), (_, _, m2, v2) = Net().exact_stats(x)
    got1 = col.collect(model, ["bn1"], [{"x": x}])["bn1"]
    np.testing.assert_allclose(got1.mean, m1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got1.var, v1, rtol=1e-5)
    fixed = col.with_stats(model, {"bn1": (got1.mean, got1.var)})
    got2 = col.collect(fixed, ["bn2"], [{"x": x[:10]}, {"x": x[10:]}])["bn2"]
    np.testing.assert_allclose(got2.mean, m2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got2.var, v2, rtol=1e-4)
    assert [s.depth for s in col.sites] == [1, 2]
    # with_stats copies: the loaded model still has the stale statistics
    again = OnnxCollector(model).sites[0]
    assert again.mean is not None and not np.allclose(again.mean, m1)


def test_streaming_over_shards_equals_one_batch(files: dict[str, Path], tmp_path: Path) -> None:
    x = data()
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.split(x, [5, 6, 17])):
        np.savez(shards / f"part{i:02d}.npz", x=part)
    one = bnfuse.fuse(files["stale"], check_stats=True, inputs=files["data"])
    many = bnfuse.fuse(files["stale"], check_stats=True, inputs=shards)
    listed = bnfuse.fuse(files["stale"], check_stats=True, inputs=sorted(shards.iterdir()))
    for res in (many, listed):
        for a, b in zip(one.bn_stats, res.bn_stats, strict=True):
            assert (a.bn, a.samples) == (b.bn, b.samples)
            assert b.mean_shift == pytest.approx(a.mean_shift, rel=1e-9)
            assert b.var_ratio == pytest.approx(a.var_ratio, rel=1e-9)
    r1 = bnfuse.fuse(files["stale"], tmp_path / "a.onnx", recalibrate=True, inputs=files["data"])
    r2 = bnfuse.fuse(files["stale"], tmp_path / "b.onnx", recalibrate=True, inputs=shards)
    assert r2.recalibration is not None and r2.recalibration.runs == 4
    np.testing.assert_allclose(
        run(tmp_path / "b.onnx", x), run(tmp_path / "a.onnx", x), rtol=1e-5, atol=1e-5
    )
    assert r1.validation is not None and r1.validation.passed


def disguised_model() -> onnx.ModelProto:
    r = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(r.normal(size=(4, 3, 1, 1)).astype(np.float32), "W"),
        numpy_helper.from_array(r.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32), "s"),
        numpy_helper.from_array(r.normal(size=(1, 4, 1, 1)).astype(np.float32), "t"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "t"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bn_in_disguise_has_no_statistics(tmp_path: Path) -> None:
    path = tmp_path / "d.onnx"
    onnx.save(disguised_model(), path)
    np.savez(tmp_path / "x.npz", x=data())
    res = bnfuse.fuse(path, check_stats=True, inputs=tmp_path / "x.npz")
    assert len(res.folds) == 1
    (entry,) = res.bn_stats
    assert entry.flag == "no-stats" and entry.kind != "BatchNormalization"
    assert "disguise" in entry.note


def test_tiny_variance_flag_and_wide_fold(tmp_path: Path) -> None:
    net, x = Net(), data()
    st1, (g2, be2, m2, v2) = net.exact_stats(x)
    v2 = v2.copy()
    v2[0] = 0.0  # a channel whose variance collapsed: its weights grow by 1/sqrt(eps)
    path = tmp_path / "tiny.onnx"
    onnx.save(net.model(st1, (g2, be2, m2, v2)), path)
    res = bnfuse.fuse(path, check_stats=True)
    assert by_name(res)["bn2"].flag == "tiny-variance"
    fold = next(f for f in res.folds if f.bn == "bn2")
    assert fold.scale_spread is not None and fold.scale_spread > 10
    assert fold.widening is not None and fold.widening > 10
    assert any("widens the weight range" in w for w in res.warnings)
    # with data: the collapsed channel also drifts (its data variance is not 0)
    np.savez(tmp_path / "x.npz", x=x)
    res = bnfuse.fuse(path, check_stats=True, inputs=tmp_path / "x.npz")
    assert by_name(res)["bn2"].flag == "drift"


# ------------------------------------------------------------------ bad data and the CLI


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": data()}, "no array for input"),
        ({"x": data()[:, :2]}, "needs"),
        ({"x": np.array(["a", "b"])}, "dtype"),
        ({"x": np.where(data() > 3, np.nan, data())}, "NaN"),
    ],
)
def test_bad_data_is_one_line_exit_2_nothing_written(
    files: dict[str, Path], tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)  # type: ignore[arg-type]
    out = tmp_path / "out.onnx"
    for flag in ("--check-stats", "--recalibrate"):
        r = runner.invoke(app, [str(files["stale"]), "-o", str(out), flag, "--inputs", str(bad)])
        assert r.exit_code == 2, r.output
        assert message in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not out.exists()


def test_too_few_samples_for_a_statistic(tmp_path: Path) -> None:
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(r.normal(size=(3, 4)).astype(np.float32), "W"),
        *(
            numpy_helper.from_array(a.astype(np.float32), n)
            for a, n in (
                (np.ones(4), "g"),
                (np.zeros(4), "b"),
                (r.normal(size=4), "m"),
                (np.ones(4), "v"),
            )
        ),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UsageError, match="too few samples"):
        bnfuse.fuse(path, check_stats=True, inputs={"x": np.ones((1, 3), np.float32)})
    res = bnfuse.fuse(path, check_stats=True, inputs={"x": r.normal(size=(9, 3)).astype("f4")})
    assert res.bn_stats[0].samples == 9


def test_recalibrate_needs_inputs(files: dict[str, Path], tmp_path: Path) -> None:
    r = runner.invoke(app, [str(files["stale"]), "-o", str(tmp_path / "o.onnx"), "--recalibrate"])
    assert r.exit_code == 2 and "--recalibrate: needs data" in r.output
    assert not (tmp_path / "o.onnx").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, [str(files["stale"]), "--check-stats", "--inputs", str(empty)])
    assert r.exit_code == 2 and "no .npz shards" in r.output


def test_cli_end_to_end(files: dict[str, Path], tmp_path: Path) -> None:
    x = data()
    np.savez(tmp_path / "a.npz", x=x[:10])
    np.savez(tmp_path / "b.npz", x=x[10:])
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    args = [
        str(files["stale"]),
        "-o",
        str(out),
        "--recalibrate",
        "--check-stats",
        "--report",
        str(rep),
        "--inputs",
        str(tmp_path / "a.npz"),
        "--inputs",
        str(tmp_path / "b.npz"),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "BN statistics: 2 normalization(s), 2 flagged" in r.output
    assert "Recalibration: 2 BN(s)" in r.output and "Weight range after folding" in r.output
    doc = json.loads(rep.read_text())
    assert [s["flag"] for s in doc["bn_stats"]] == ["drift", "drift"]
    assert doc["recalibration"]["runs"] == 2 and doc["folds"][0]["widening"] > 0
    want = run(files["exact"], x)
    np.testing.assert_allclose(run(out, x), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    r = runner.invoke(
        app, [str(files["exact"]), "--check-stats", "--json", "--inputs", str(files["data"])]
    )
    assert r.exit_code == 0
    assert {s["flag"] for s in json.loads(r.stdout)["bn_stats"]} == {"ok"}


def test_check_stats_on_onnx_never_imports_tensorflow(files: dict[str, Path]) -> None:
    code = (
        "import sys, bnfuse\n"
        f"bnfuse.fuse({str(files['stale'])!r}, recalibrate=True, check_stats=True, "
        f"inputs={str(files['data'])!r})\n"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=root
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_recalibrating_shared_statistics_gives_each_bn_its_own(tmp_path: Path) -> None:
    r = np.random.default_rng(7)
    w = r.normal(0, 1, (3, 3, 1, 1)).astype(np.float32)
    arrays = {"W": w, "g": np.ones(3), "b": np.zeros(3), "m": np.zeros(3), "v": np.ones(3)}
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items()]
    nodes = [  # both BNs read the same (never updated) statistics tensors
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn_a"),
        helper.make_node("Conv", ["n", "W"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = data()
    np.savez(tmp_path / "x.npz", x=x)
    res = bnfuse.fuse(path, recalibrate=True, inputs=tmp_path / "x.npz")
    assert {s.flag for s in res.bn_stats} == {"default"}
    assert res.recalibration is not None and res.recalibration.waves == 2
    x64 = x.astype(np.float64)
    n = (x64 - x64.mean((0, 2, 3))[:, None, None]) / np.sqrt(x64.var((0, 2, 3)) + EPS)[
        :, None, None
    ]
    c = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), n)
    want = (c - c.mean((0, 2, 3))[:, None, None]) / np.sqrt(c.var((0, 2, 3)) + EPS)[:, None, None]
    got = run(bnfuse.fuse(path, recalibrate=True, inputs={"x": x}).model, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
