"""Python API: fuse() on paths and ModelProto objects, typed result, no tensorflow import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx_util import GraphBuilder

import bnfuse
from bnfuse import FuseResult, UsageError


def model() -> onnx.ModelProto:
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn")
    b.output(y)
    return b.model()


def test_fuse_model_object_not_mutated() -> None:
    m = model()
    before = m.SerializeToString()
    res = bnfuse.fuse(m)
    assert isinstance(res, FuseResult)
    assert m.SerializeToString() == before
    assert res.backend == "onnx" and res.ok and not res.written
    assert [f.bn for f in res.folds] == ["bn"]
    assert res.before.bn_nodes == 1 and res.after.bn_nodes == 0
    assert res.after.nodes == res.before.nodes - 1
    assert isinstance(res.model, onnx.ModelProto)
    d = res.to_dict()
    assert "model" not in d
    json.dumps(d)
    with pytest.raises(AttributeError):
        res.backend = "keras"  # type: ignore[misc]


def test_fuse_path_writes_atomically(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(model(), src)
    out = tmp_path / "f.onnx"
    res = bnfuse.fuse(src, out)
    assert res.written and out.exists()
    assert res.after.file_size == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "m.onnx"]  # no temp file
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_unvalidated_path_fold_equals_copying_fold(tmp_path: Path) -> None:
    # without validation a model loaded from a path is folded in place (no copy); the
    # result must be the same as folding a caller's object, which is never mutated
    m = model()
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    before = m.SerializeToString()
    from_obj = bnfuse.fuse(m, validate=False)
    from_path = bnfuse.fuse(src, tmp_path / "f.onnx", validate=False)
    assert m.SerializeToString() == before
    assert from_path.model.SerializeToString() == from_obj.model.SerializeToString()
    assert onnx.load(tmp_path / "f.onnx") == from_path.model
    assert src.read_bytes() == before


def spy_sessions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (level, threads) of every onnxruntime session bnfuse creates."""
    from bnfuse.onnx import backend as onnx_backend

    made: list[tuple[str, int]] = []
    real = onnx_backend._cpu_session

    def spy(data: Any, level: str, threads: int, *provider: str) -> Any:
        made.append((level, threads))
        return real(data, level, threads, *provider)

    monkeypatch.setattr(onnx_backend, "_cpu_session", spy)
    return made


def test_validation_runs_both_sides_with_graph_optimizations_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # onnxruntime folds Conv+BN itself from ORT_ENABLE_BASIC on: at any level above
    # ORT_DISABLE_ALL the "original" would already be fused and validation would prove nothing
    made = spy_sessions(monkeypatch)
    res = bnfuse.fuse(model())
    assert res.validation is not None and res.validation.passed
    assert len(made) >= 2  # the original and the fused model
    assert {level for level, _ in made} == {"ORT_DISABLE_ALL"}
    assert res.validation.runtime == "onnxruntime CPU, ORT_DISABLE_ALL"


def test_benchmark_sessions_get_the_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfuse.bench

    made = spy_sessions(monkeypatch)
    timed: list[tuple[str, int]] = []  # the sessions made while timing
    real_run = bnfuse.bench.run

    def run(*args: Any, **kwargs: Any) -> Any:
        start = len(made)
        try:
            return real_run(*args, **kwargs)
        finally:
            timed.extend(made[start:])

    monkeypatch.setattr(bnfuse.bench, "run", run)
    m = model()
    fused = bnfuse.fuse(m, validate=False).model
    result = bnfuse.benchmark(m, fused, threads=2, seconds=0.2)
    assert result.threads == 2
    assert sorted(timed) == [("ORT_DISABLE_ALL", 2)] * 2 + [("ORT_ENABLE_ALL", 2)] * 2
    assert {r.runtime for r in result.rows} == {
        "onnxruntime ORT_DISABLE_ALL",
        "onnxruntime ORT_ENABLE_ALL",
    }


def test_dry_run_does_not_write(tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    res = bnfuse.fuse(model(), out, dry_run=True)
    assert res.dry_run and not res.written and not out.exists()


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        bnfuse.fuse(model(), skip=["nope"])
    with pytest.raises(UsageError):
        bnfuse.fuse(42)


def test_public_api_is_typed() -> None:
    import inspect

    root = Path(bnfuse.__file__).parent
    assert (root / "py.typed").exists()
    for name in bnfuse.__all__:
        obj = getattr(bnfuse, name)
        assert obj.__doc__, f"{name} lacks a docstring"
    sig = inspect.signature(bnfuse.fuse)
    assert sig.return_annotation in ("FuseResult", FuseResult)


def test_onnx_path_never_imports_tensorflow(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(model(), src)
    code = textwrap.dedent(
        f"""
        import sys
        import bnfuse
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        bnfuse.fuse({str(src)!r}, {str(tmp_path / "f.onnx")!r}, bench=True, bench_seconds=0.2)
        bad = [m for m in ("tensorflow", "keras", "tf2onnx") if m in sys.modules]
        print("imported:", bad)
        sys.exit(1 if bad else 0)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
