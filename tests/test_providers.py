"""``--provider``: onnxruntime execution providers to time, named in every report."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from bnfuse import api, providers
from bnfuse.errors import UsageError
from bnfuse.onnx.backend import OnnxBackend

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "digits_cnn_bn.onnx"
CPU = "CPUExecutionProvider"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_is_always_first_and_names_are_resolved() -> None:
    assert providers.resolve([]) == (CPU,)
    assert providers.resolve(["cpu", "CPU", "CPUExecutionProvider"]) == (CPU,)
    assert providers.short_name("TensorrtExecutionProvider") == "TensorRT"
    assert providers.label(CPU, "ORT_ENABLE_ALL") == "onnxruntime ORT_ENABLE_ALL"
    assert providers.label("CUDAExecutionProvider", "ORT_DISABLE_ALL") == (
        "onnxruntime CUDA ORT_DISABLE_ALL"
    )


def test_unknown_provider_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown execution provider; use one of"):
        providers.resolve(["warp-drive"])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
@pytest.mark.parametrize(
    ("name", "package"),
    [("cuda", "onnxruntime-gpu"), ("TensorRT", "onnxruntime-gpu"), ("openvino", "openvino")],
)
def test_provider_missing_from_the_build_names_the_package(name: str, package: str) -> None:
    with pytest.raises(UsageError, match="is not in this onnxruntime build") as info:
        providers.resolve([name])
    assert package in info.value.message and "CPUExecutionProvider" in info.value.message


def test_keras_models_refuse_other_providers() -> None:
    assert providers.for_backend("keras", ["cpu"]) == ()
    with pytest.raises(UsageError, match="apply to ONNX models"):
        providers.for_backend("keras", ["cuda"])


def test_bench_targets_time_each_provider_at_both_levels() -> None:
    backend = OnnxBackend()
    model = backend.load(SAMPLE)
    labels = [
        t.runtime
        for t in backend.bench_targets(model, 1, providers=(CPU, "OpenVINOExecutionProvider"))
    ]
    assert labels == [
        "onnxruntime ORT_DISABLE_ALL",
        "onnxruntime ORT_ENABLE_ALL",
        "onnxruntime OpenVINO ORT_DISABLE_ALL",
        "onnxruntime OpenVINO ORT_ENABLE_ALL",
    ]


def test_cpu_provider_is_named_in_every_report(tmp_path: Path) -> None:
    from bnfuse import report
    from bnfuse.cli import app

    rj, rm, rh = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.html"
    args = [str(SAMPLE), "--dry-run", "--bench", "--bench-seconds", "0.1", "--provider", "cpu"]
    res = CliRunner().invoke(
        app, [*args, "--report", str(rj), "--report", str(rm), "--report", str(rh)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(rj.read_text(encoding="utf-8"))
    assert data["bench"]["providers"] == [CPU]
    assert f"providers {CPU}" in rm.read_text(encoding="utf-8")
    assert f"providers {CPU}" in " ".join(res.output.split())
    assert f"<b>{CPU}</b>" in rh.read_text(encoding="utf-8")
    assert data["schema"] == report.SCHEMA


def test_provider_needs_bench_and_a_present_provider() -> None:
    from bnfuse.cli import app

    res = CliRunner().invoke(app, [str(SAMPLE), "--dry-run", "--provider", "cpu"])
    assert res.exit_code == 2 and "--provider: chooses where the benchmark runs" in res.output
    res = CliRunner().invoke(app, [str(SAMPLE), "--dry-run", "--bench", "--provider", "nope"])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "Traceback" not in res.output


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_a_provider_that_silently_falls_back_to_cpu_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider listed by the build can still fail to start (no device, no CUDA
    libraries); onnxruntime then runs on the CPU, and the timings must not be reported
    as CUDA timings."""
    monkeypatch.setattr(providers, "_available", lambda: [CPU, "CUDAExecutionProvider"])
    with pytest.raises(UsageError, match="did not start"):
        api.fuse(SAMPLE, dry_run=True, bench=True, bench_seconds=0.1, providers=["cuda"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_rows_are_timed_on_cuda() -> None:
    res = api.fuse(
        SAMPLE, dry_run=True, bench=True, bench_seconds=0.5, batches=(1, 8), providers=["cuda"]
    )
    assert res.bench is not None
    assert res.bench.providers == (CPU, "CUDAExecutionProvider")
    cuda_rows = [r for r in res.bench.rows if r.runtime.startswith("onnxruntime CUDA ")]
    assert len(cuda_rows) == 4
