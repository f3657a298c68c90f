"""Reports: terminal (rich), Markdown, JSON and its documented schema."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import onnx
import pytest
from rich.console import Console

from bnfuse import report, report_files
from bnfuse.bench import ORT_FOLDS_NOTE
from bnfuse.errors import UsageError
from bnfuse.result import (
    BenchResult,
    BnStat,
    Fold,
    FuseResult,
    LatencyRow,
    LatencyStats,
    ModelStats,
    OutputMetrics,
    OutputShift,
    Recalibration,
    Refusal,
    Validation,
)

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"


def stats(median: float, batch: int = 1) -> LatencyStats:
    return LatencyStats(
        median_ms=median,
        p90_ms=median * 1.1,
        p99_ms=median * 1.3,
        mean_ms=median * 1.05,
        std_ms=median * 0.02,
        runs=123,
        throughput=batch / (median / 1e3),
        min_ms=median * 0.9,
    )


def full_result(**changes: Any) -> FuseResult:
    """A FuseResult with every optional part filled in."""
    validation = Validation(
        passed=False,
        samples=8,
        runtime="onnxruntime CPU, ORT_DISABLE_ALL",
        outputs=(
            OutputMetrics(
                name="logits",
                max_abs_error=3.25e-6,
                max_rel_error=1.5e-5,
                mean_abs_error=4.0e-7,
                cosine_similarity=0.99999999,
                top1_agreement=1.0,
                min_atol=2.75e-6,
                rtol=1e-4,
                atol=1.2e-4,
                passed=True,
                dtype="float32",
                shape=(1, 10),
                elements=80,
                mismatches=0,
                reason="",
                fused_name="",
            ),
            OutputMetrics(
                name="features",
                max_abs_error=float("inf"),
                max_rel_error=float("inf"),
                mean_abs_error=0.0625,
                cosine_similarity=float("nan"),
                top1_agreement=None,
                min_atol=float("inf"),
                rtol=1e-4,
                atol=1e-5,
                passed=False,
                dtype="float32",
                shape=(1, 4, 2, 2),
                elements=128,
                mismatches=3,
                reason="3 of 128 elements non-finite or out of tolerance",
                fused_name="features_fused",
            ),
        ),
        culprits=("bn2",),
        rolled_back=("bn2",),
        input_source="random (seed 0, 8 samples)",
    )
    bench = BenchResult(
        rows=(
            LatencyRow(
                runtime="onnxruntime ORT_DISABLE_ALL",
                batch=1,
                original=stats(1.875),
                fused=stats(1.25),
                speedup=1.5,
                speedup_ci=(1.4, 1.6),
                note="CPUExecutionProvider",
            ),
            LatencyRow(
                runtime="onnxruntime ORT_ENABLE_ALL",
                batch=32,
                original=stats(20.5, 32),
                fused=stats(20.0, 32),
                speedup=1.02,
                speedup_ci=(0.97, 1.08),
                note="",
            ),
        ),
        setup_ms={
            "onnxruntime ORT_DISABLE_ALL original": 12.5,
            "onnxruntime ORT_DISABLE_ALL fused": 11.0,
        },
        first_run_ms={"onnxruntime ORT_DISABLE_ALL original batch=1": 3.5},
        threads=2,
        machine={
            "cpu": "Test CPU 9000",
            "logical_cores": 2,
            "usable_cores": 2,
            "arch": "x86_64",
            "os": "Linux-test",
            "python": "3.11.7",
            "numpy": "2.0.0",
            "onnxruntime": "1.32.0",
            "tensorflow": None,
        },
        notes=("batch 64 skipped: input 'x' has a fixed batch dimension of 1", ORT_FOLDS_NOTE),
        seconds=10.0,
    )
    result = FuseResult(
        backend="onnx",
        source="models/resnet.onnx",
        folds=(
            Fold(
                "bn1",
                "conv1",
                "conv_bn",
                "backward",
                16,
                detail="Conv[16,3,3,3]",
                scope="",
                widening=12.5,
                scale_spread=3.0,
            ),
            Fold("bn3", "fc", "bn_gemm", "forward", 64, kind="BatchNormalization", scope="body"),
        ),
        refusals=(
            Refusal("bn2", "excluded (rolled back)", rule="conv_bn"),
            Refusal("bn|weird<name>", "the Conv output has 2 consumers", rule="conv_bn"),
        ),
        before=ModelStats(
            10, 3, 1000, trainable_params=900, non_trainable_params=100, file_size=40960
        ),
        after=ModelStats(8, 1, 900, trainable_params=900, non_trainable_params=0, file_size=36864),
        model=object(),
        output_path="out/fused.onnx",
        written=True,
        dry_run=False,
        validation=validation,
        bench=bench,
        bnfuse_version="0.1.0",
        warnings=("rolled back 1 fold(s): bn2",),
        bn_stats=(
            BnStat(
                "bn1",
                "drift",
                mean_shift=2.5,
                var_ratio=7.25,
                max_scale=1.5,
                channels=16,
                samples=512,
                recalibrated=True,
                note="mean off by 2.5 std (limit 0.5)",
            ),
            BnStat("bn3", "ok", 0.125, 1.25, 2.0, 64, 512),
        ),
        recalibration=Recalibration(
            bns=("bn1", "bn3"),
            waves=2,
            runs=4,
            outputs=(OutputShift("logits", 0.75, 0.5, 0.875),),
        ),
    )
    return dataclasses.replace(result, **changes)


def rendered(result: FuseResult, verbose: bool = False) -> str:
    console = Console(record=True, width=160, color_system=None)
    report.render(result, console, verbose=verbose)
    return console.export_text()


# ------------------------------------------------------------------ terminal


def test_render_shows_every_bn_and_why() -> None:
    out = rendered(full_result(), verbose=True)
    for name in ("bn1", "bn2", "bn3", "bn|weird<name>", "conv1", "fc"):
        assert name in out
    assert "folded backward" in out and "folded forward" in out
    assert "the Conv output has 2 consumers" in out
    assert "rolled back" in out and "its fold failed validation" in out
    assert "body" in out  # scope column appears when any BN is in a subgraph
    assert "models/resnet.onnx → out/fused.onnx (written)" in out
    assert "[onnx]" in out


def test_header_names_the_framework() -> None:
    out = " ".join(rendered(full_result(framework="ONNX opset 13, IR 8 (tf2onnx 1.17.0)")).split())
    assert "[onnx: ONNX opset 13, IR 8 (tf2onnx 1.17.0)]: models/resnet.onnx" in out
    md = report.to_markdown(full_result(framework="Keras 2 (tf_keras 2.21.0)"))
    assert md.splitlines()[0].startswith("# bnfuse 0.1.0 [onnx: Keras 2 (tf_keras 2.21.0)]")


def test_framework_of_a_real_onnx_file() -> None:
    import bnfuse

    sample = Path(__file__).resolve().parents[1] / "sample_models" / "digits_cnn_bn.onnx"
    res = bnfuse.fuse(sample, validate=False)
    proto = onnx.load(str(sample))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert res.framework.startswith(f"ONNX opset {opset}, IR {proto.ir_version}")
    assert res.to_dict()["framework"] == res.framework


def test_render_groups_bns_by_default() -> None:
    out = " ".join(rendered(full_result()).split())
    assert "1 folded backward by conv_bn" in out and "1 folded forward by bn_gemm" in out
    assert "1 rolled back: its fold failed validation: bn2" in out
    assert "1 left: the Conv output has 2 consumers: bn|weird<name>" in out
    assert "setup onnxruntime ORT_DISABLE_ALL original 12.5 ms" in out  # one-off: one line


def test_render_before_after_validation_and_latency_numbers() -> None:
    out = rendered(full_result())
    assert "1,000" in out and "900" in out and "40.0 KiB" in out and "36.0 KiB" in out
    assert "-100 (-10.0%)" in out
    assert "non-trainable" in out
    assert "Validation FAILED: onnxruntime CPU, ORT_DISABLE_ALL, 8 run(s)" in out
    assert "3.2e-06" in out  # max abs error of logits
    assert "1-1.0e-08" in out  # cosine just below 1
    assert "100.0%" in out  # top-1
    assert "features (fused: features_fused)" in out
    assert "FAIL: 3 of 128 elements" in out and "pass" in out
    assert "inf" in out
    assert "responsible fold(s) found by bisection: bn2" in out
    assert "1.875" in out and "1.250" in out  # medians
    assert "1.50x [1.40x, 1.60x]" in out
    assert "533 → 800" in out  # throughput per second
    flat = " ".join(out.split())  # (the one-off costs are one wrapped line by default)
    assert "setup onnxruntime ORT_DISABLE_ALL original" in flat and "12.5" in flat
    assert "first run onnxruntime ORT_DISABLE_ALL original batch=1" in flat
    assert "Test CPU 9000" in out
    assert "warning: rolled back 1 fold(s): bn2" in out
    assert "onnxruntime already folds Conv+BatchNormalization" in out
    assert "batch 64 skipped" in out


def test_ort_note_sits_right_under_the_latency_table() -> None:
    assert "at ORT_ENABLE_BASIC and above, including the default ORT_ENABLE_ALL" in ORT_FOLDS_NOTE
    console = Console(record=True, width=400, color_system=None)
    report.render(full_result(), console)
    lines = [line.strip() for line in console.export_text().splitlines()]
    note = lines.index(f"note: {ORT_FOLDS_NOTE}")
    last_row = max(i for i, line in enumerate(lines) if line.endswith("123+123"))  # runs
    assert lines[last_row].startswith("onnxruntime ORT_ENABLE_ALL")  # the latency table's
    assert note == last_row + 1
    notes_at = lines.index("Notes")
    assert note < notes_at
    assert not any("already folds" in line for line in lines[notes_at:])
    assert "note: batch 64 skipped" in "\n".join(lines[notes_at:])  # other notes stay

    md = report.to_markdown(full_result()).splitlines()
    note = md.index(f"- note: {ORT_FOLDS_NOTE}")
    assert md[note - 1] == "" and md[note - 2].startswith("| onnxruntime ORT_ENABLE_ALL |")
    assert not any("already folds" in line for line in md[md.index("## Notes") :])


@pytest.mark.parametrize("verbose", [False, True])
def test_latency_columns_say_which_model(verbose: bool) -> None:
    md = report.to_markdown(full_result(), verbose=verbose)
    header = next(line for line in md.splitlines() if line.startswith("| runtime |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert "p90" not in cells
    assert cells.index("orig p90") < cells.index("fused median ms") < cells.index("fused p90")
    if verbose:
        assert {"orig p99", "fused p99", "orig mean ± std", "fused mean ± std"} <= set(cells)
    lines = md.splitlines()
    headers = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("|---")]
    assert header in headers
    for h in headers:  # no table has two columns with the same header
        named = [c.strip() for c in h.strip("|").split("|") if c.strip()]
        assert len(named) == len(set(named)), h
    out = rendered(full_result(), verbose=verbose)
    assert "orig p90" in out and "fused p90" in out


def test_render_verbose_adds_detail() -> None:
    out = rendered(full_result(), verbose=True)
    assert "Conv[16,3,3,3]" in out and "mean abs" in out and "p99" in out and "1x10" in out
    assert "Conv[16,3,3,3]" not in rendered(full_result())


def test_render_does_not_interpret_markup_in_names() -> None:
    r = full_result(refusals=(Refusal("bn[bold]x[/bold]", "reason [red]y[/red]"),))
    out = rendered(r)
    assert "bn[bold]x[/bold]" in out and "reason [red]y[/red]" in out


def test_render_dry_run_and_minimal_results() -> None:
    r = full_result(dry_run=True, written=False, validation=None, bench=None, warnings=())
    out = rendered(r)
    assert "dry run: nothing written" in out
    assert "Latency" not in out
    empty = full_result(
        folds=(), refusals=(), validation=None, bench=None, output_path=None, written=False
    )
    out = rendered(empty)
    assert "no BatchNormalization" in out and "nothing written" in out
    failed = full_result(written=False)
    assert "not written: validation failed" in rendered(failed)


# ------------------------------------------------------------------ Markdown


def test_markdown_has_tables_with_the_same_content() -> None:
    md = report.to_markdown(full_result())
    assert md.startswith("# bnfuse 0.1.0 [onnx]")
    tables = [line for line in md.splitlines() if re.fullmatch(r"\|(-{3}:?\|)+", line)]
    # BNs, before/after, validation, BN statistics, weight range, recalibration, latency,
    # one-off costs
    assert len(tables) == 8
    assert "| `bn1` | BatchNormalization | folded backward | `conv1` |" in md
    assert "`bn\\|weird<name>`" in md  # pipes escaped inside code spans
    assert "1.50x [1.40x, 1.60x]" in md
    assert "**FAIL: 3 of 128 elements non-finite or out of tolerance**" in md
    assert "- warning: rolled back 1 fold(s): bn2" in md
    for line in md.splitlines():  # every table row has as many cells as its header
        if line.startswith("|"):
            assert line.endswith("|")
    _check_table_widths(md)


def _check_table_widths(md: str) -> None:
    width = None
    for line in md.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        if width is None:
            width = cells
        assert cells == width, line


# ------------------------------------------------------------------ JSON and schema


def _documented_paths() -> tuple[set[str], set[str]]:
    """(every documented key path, the paths documented as maps) from the schema doc."""
    paths: set[str] = set()
    maps: set[str] = set()
    prefixes: list[str] | None = None
    for line in SCHEMA_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            heading = line[3:]
            if heading.strip() == "Top level":
                prefixes = [""]
            else:
                found = re.findall(r"`([^`]+)`", heading.split(" — ")[0])
                prefixes = found or None
            continue
        m = re.match(r"\| `([a-z0-9_]+)` \| ([^|]+) \|", line)
        if m and prefixes is not None:
            for p in prefixes:
                path = f"{p}.{m.group(1)}" if p else m.group(1)
                paths.add(path)
                if "(map)" in m.group(2):
                    maps.add(path)
    return paths, maps


def _json_paths(obj: Any, maps: set[str], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in obj.items():
        path = f"{prefix}.{key}" if prefix else key
        out.add(path)
        if path in maps:
            continue
        if isinstance(value, dict):
            out |= _json_paths(value, maps, path)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                out |= _json_paths(v, maps, path + "[]")
    return out


def test_json_matches_the_documented_schema_exactly() -> None:
    documented, maps = _documented_paths()
    assert len(documented) > 80 and "bench.setup_ms" in maps  # the parser found the tables
    data = json.loads(report.to_json(full_result()))
    assert data["schema"] == report.SCHEMA == "bnfuse.result/1"
    found = _json_paths(data, maps)
    assert found - documented == set(), "undocumented keys"
    assert documented - found == set(), "documented keys missing from the JSON"


def test_json_round_trips_with_nonfinite_as_null() -> None:
    text = report.to_json(full_result())
    data = json.loads(text)
    assert "NaN" not in text and "Infinity" not in text
    feats = data["validation"]["outputs"][1]
    assert feats["max_abs_error"] is None and feats["cosine_similarity"] is None
    assert feats["min_atol"] is None and feats["mean_abs_error"] == 0.0625
    assert data["bench"]["rows"][0]["speedup_ci"] == [1.4, 1.6]
    assert data["validation"]["outputs"][0]["shape"] == [1, 10]
    assert data["bench"]["machine"]["tensorflow"] is None
    assert "model" not in data
    assert json.dumps(data, indent=2, sort_keys=True, allow_nan=False) == text
    assert list(data) == sorted(data)


def test_json_of_a_minimal_result_has_null_sections() -> None:
    data = json.loads(report.to_json(full_result(validation=None, bench=None)))
    assert data["validation"] is None and data["bench"] is None


# ------------------------------------------------------------------ files


def test_write_report_markdown_and_json(tmp_path: Path) -> None:
    r = full_result()
    report_files.write_report(r, tmp_path / "r.md")
    report_files.write_report(r, tmp_path / "r.json")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == report.to_markdown(r)
    assert (
        json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["schema"] == "bnfuse.result/1"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temp files left


@pytest.mark.parametrize("name", ["r.txt", "r", "r.htm"])
def test_write_report_refuses_other_suffixes(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match=r"\.md, \.json or \.html"):
        report_files.write_report(full_result(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_write_report_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        report_files.write_report(full_result(), tmp_path / "nope" / "r.md")


def test_write_report_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "r.json"
    dest.write_text("old", encoding="utf-8")

    def boom(_: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "to_json", boom)
    with pytest.raises(KeyboardInterrupt):
        report_files.write_report(full_result(), dest)
    assert dest.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_bn_statistics_widening_and_recalibration_sections() -> None:
    out = rendered(full_result())
    assert "BN statistics: 2 normalization(s), 1 flagged" in out
    assert out.index("drift") < out.index("  ok  ")  # worst first, as given
    assert "mean off by 2.5 std" in out
    assert "12.5x" in out and "1 fold(s) widen the weight range more than 10x" in out
    assert "Recalibration: 2 BN(s) re-estimated" in out and "87.5%" in out
    md = report.to_markdown(full_result(bn_stats=(), recalibration=None))
    assert "BN statistics" not in md and "Recalibration" not in md
    plain = (dataclasses.replace(f, widening=None, scale_spread=None) for f in full_result().folds)
    assert "Weight range" not in report.to_markdown(full_result(folds=tuple(plain)))
