"""The benchmark scripts as a package (benchmarks/README.md, Layout): every file within
the size limit, every entry point answering as documented, and the head-to-head's
verdicts, JSON and RESULTS.md section computed from hand-made results (no timing here:
speed targets live in benchmarks/, never in the unit tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENTRY_POINTS = (
    "run.py",
    "fold_speed.py",
    "scale.py",
    "affine_vs_ort.py",
    "startup.py",
    "exporters.py",
    "keras2.py",
)


@pytest.fixture(scope="module")
def bench() -> Iterator[SimpleNamespace]:
    """The compare package imported as the scripts import it (benchmarks/ first on
    sys.path); its modules are dropped again afterwards, so that names such as
    ``models`` do not leak into other tests."""
    sys.path.insert(0, str(BENCH))
    try:
        import compare.cases as cases
        import compare.render as render
        import compare.results as results
        import compare.verdicts as verdicts

        yield SimpleNamespace(cases=cases, render=render, results=results, verdicts=verdicts)
    finally:
        sys.path.remove(str(BENCH))
        for name, mod in list(sys.modules.items()):
            if str(getattr(mod, "__file__", None) or "").startswith(str(BENCH)):
                del sys.modules[name]


def test_no_benchmark_source_file_over_800_lines() -> None:
    sizes = {p.relative_to(BENCH): len(p.read_text().splitlines()) for p in BENCH.rglob("*.py")}
    assert len(sizes) >= 10
    assert {p: n for p, n in sizes.items() if n > 800} == {}


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_point_answers_help(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


def test_run_lists_its_models_and_refuses_unknown_ones(bench: SimpleNamespace) -> None:
    listed = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--list"], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines() if "[" in line]
    names = [r[1] if r[0] == "*" else r[0] for r in rows]
    assert names == list(bench.cases.CASES) and len(names) > 7
    assert [r[1] for r in rows if r[0] == "*"] == list(bench.cases.QUICK)
    bad = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--models", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "unknown model(s): nope" in bad.stderr


def _tool(ns: SimpleNamespace, name: str, left: int, ms: float, err: float) -> Any:
    r = ns.results.ToolResult(name, fold_s=[ms / 1000] * 3, bn=left, affine=0, nodes=10 + left)
    r.err_abs, r.err_rel, r.wrong_above = err, err, 1e-3
    return r


def _case(ns: SimpleNamespace, tools: dict[str, Any], strict: list[str]) -> Any:
    onnx_result = ns.results.OnnxResult(
        file="m.onnx",
        size_mb=1.0,
        nodes=14,
        bn=4,
        affine=0,
        error_inputs={"x": [2, 3]},
        reference="onnxruntime (float64)",
        reference_note="",
        ref_max_abs=2.0,
        err_original_abs=1e-6,
        err_original_rel=5e-7,
        tools=tools,
        folds={"conv-bn (backward)": 4},
        strict_kinds=strict,
    )
    return ns.results.CaseResult("m", "hand-built", "a model", [], onnx=onnx_result)


def test_verdicts_from_hand_made_results(bench: SimpleNamespace) -> None:
    tools = {
        "bnfuse": _tool(bench, "bnfuse", 0, 5.0, 2e-6),
        "onnxruntime": _tool(bench, "onnxruntime", 2, 4.0, 1e-6),
        # folds as much as bnfuse and faster, but its output is wrong: out of every
        # comparison
        "onnxslim": _tool(bench, "onnxslim", 0, 1.0, 0.5),
    }
    case = _case(bench, tools, ["gemm-bn"])
    checks = {c.target: c for c in bench.verdicts.checks([case])}
    assert checks["nodes"].met is True
    assert "best peer 2 (onnxruntime)" in checks["nodes"].detail
    assert checks["strict"].met is True
    assert checks["time"].met is False  # 5.0 ms vs 4.0 ms
    assert checks["time-same-work"].met is None  # the only peer folding as much is wrong
    assert checks["error"].met is True  # 2e-6 <= 1e-6 + the original's own 1e-6
    wins = bench.verdicts.peer_wins([case])
    assert wins == ["m.onnx: onnxruntime folds faster (4.0 vs 5.0 ms, bnfuse 1.25x slower)"]
    lines = bench.verdicts.verdict_lines([case])
    assert "- met: BN/affine nodes left: bnfuse <= best peer (1 of 1 models)" in lines
    assert any(x.startswith("- info (not a target") and "slower: m.onnx" in x for x in lines)
    assert any("onnxslim output wrong" in x for x in lines)


def test_a_peer_that_folds_more_is_a_missed_target(bench: SimpleNamespace) -> None:
    tools = {
        "bnfuse": _tool(bench, "bnfuse", 2, 3.0, 1e-6),
        "onnxscript": _tool(bench, "onnxscript", 1, 9.0, 1e-6),
    }
    case = _case(bench, tools, [])
    lines = bench.verdicts.verdict_lines([case])
    assert lines[0].startswith("- **MISSED** BN/affine nodes left: bnfuse <= best peer: 1 of 1")
    assert "m.onnx: onnxscript leaves fewer BN/affine nodes (1 vs 2)" in "\n".join(lines)
    table = bench.render.table_nodes([case])
    assert table[2].endswith("| **onnxscript** |")


def test_json_has_no_nan_and_keeps_its_schema(bench: SimpleNamespace) -> None:
    tools = {"bnfuse": _tool(bench, "bnfuse", 0, 5.0, math.nan)}
    case = _case(bench, tools, [])
    args = SimpleNamespace(reps=3, keras_reps=1, seconds=1.5, quick=True, note=[])
    data = bench.render.to_json([case], {"cpu": "x"}, args, [])
    text = json.dumps(data, allow_nan=False)  # raises on a NaN left in
    assert data["schema"] == "bnfuse.benchmarks.run/1"
    tool = data["cases"][0]["onnx"]["tools"]["bnfuse"]
    assert tool["err_abs"] is None and tool["left"] == 0 and tool["fold_ms"] == 5.0
    assert "verdict" in json.loads(text)


def test_summary_section_goes_after_the_first_paragraph_then_is_replaced(
    bench: SimpleNamespace, tmp_path: Path
) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nFirst paragraph.\n\n## Later\n\ntext\n")
    render = bench.render
    render.update_summary(path, [render.BEGIN, "one", render.END])
    assert path.read_text() == (
        "# Results\n\nFirst paragraph.\n\n<!-- run.py:begin -->\none\n<!-- run.py:end -->\n"
        "\n## Later\n\ntext\n"
    )
    render.update_summary(path, [render.BEGIN, "two", render.END])
    text = path.read_text()
    assert "two" in text and "one" not in text and text.count(render.BEGIN) == 1


def test_an_unusable_bnfuse_output_misses_every_target(bench: SimpleNamespace) -> None:
    tools = {
        "bnfuse": _tool(bench, "bnfuse", 0, 5.0, 2e-6),
        "onnxruntime": _tool(bench, "onnxruntime", 2, 4.0, 1e-6),
    }
    tools["bnfuse"].failed = "RuntimeError: boom"
    case = _case(bench, tools, ["gemm-bn"])
    checks = bench.verdicts.checks([case])
    assert [(c.target, c.met) for c in checks] == [
        (t, False) for t in ("nodes", "strict", "time", "error", "latency")
    ]
    assert all(c.detail == "bnfuse output unusable: RuntimeError: boom" for c in checks)
