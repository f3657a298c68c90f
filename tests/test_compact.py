"""The terminal report fits a screen by default; -v lists every BN with its full name,
never cut, whatever the terminal width."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx_util import GraphBuilder
from rich.console import Console

import bnfuse
from bnfuse.report import render, to_markdown

SUFFIX = "/BatchNormalization_with_a_rather_long_exporter_suffix_that_exceeds_eighty_columns"


def name(i: int, which: str) -> str:
    return f"features.denseblock3.denselayer{i}.{which}{SUFFIX}"


def make_densenet_like(path: Path, blocks: int = 60) -> Path:
    """121 BNs (DenseNet121 has 121): 61 after a Conv (folded), 60 between two Relus
    (left in place), all with long exporter-style names."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 4, 8, 8])
    y = b.bn(b.conv(x, 4, 4, [3, 3], pads=[1] * 4), 4, name=name(0, "norm1"))
    for i in range(1, blocks + 1):
        y = b.bn(b.conv(y, 4, 4, [3, 3], pads=[1] * 4), 4, name=name(i, "norm1"))
        y = b.node("Relu", [b.bn(b.node("Relu", [y]), 4, name=name(i, "norm2"))])
    b.output(y)
    onnx.save(b.model(), path)
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> bnfuse.FuseResult:
    tmp = tmp_path_factory.mktemp("compact")
    src = make_densenet_like(tmp / "dense.onnx")
    return bnfuse.fuse(src, tmp / "f.onnx", bench=True, bench_seconds=0.2, samples=2)


def rendered(result: bnfuse.FuseResult, width: int, verbose: bool = False) -> str:
    buf = io.StringIO()
    render(result, Console(file=buf, width=width, force_terminal=False), verbose=verbose)
    return buf.getvalue()


def test_default_report_of_121_bns_fits_a_screen(result: bnfuse.FuseResult) -> None:
    assert len(result.folds) == 61 and len(result.refusals) == 60
    text = rendered(result, width=120)
    lines = text.splitlines()
    assert len(lines) <= 40, text
    assert "Normalizations: 61 folded, 60 left in place" in text
    assert "61  folded backward  by conv-bn" in text
    (left,) = [ln for ln in lines if ln.strip().startswith("60 left:")]
    assert name(1, "norm2") in left and "more)" in left  # a few names, full, then a count
    for title in ("Model before → after", "Validation passed", "Latency", "one-off:"):
        assert title in text
    assert sum(name(i, "norm1") in text for i in range(61)) == 0  # folded: summed, not listed


@pytest.mark.parametrize("width", [80, 300])
def test_verbose_lists_every_bn_with_its_full_name(result: bnfuse.FuseResult, width: int) -> None:
    text = rendered(result, width=width, verbose=True)
    lines = text.splitlines()
    for f in result.folds:
        assert any(ln.startswith(f.bn + " ") and f.into in ln for ln in lines), f.bn
    for r in result.refusals:
        assert any(ln.startswith(r.bn + " ") and "refused" in ln for ln in lines), r.bn
    bn_part = text.split("Model before")[0]
    assert "…" not in bn_part


def test_markdown_still_holds_every_bn(result: bnfuse.FuseResult) -> None:
    md = to_markdown(result)
    assert all(f"`{f.bn}`" in md for f in result.folds)
    assert all(f"`{r.bn}`" in md for r in result.refusals)


def test_cli_verbose_at_80_columns_never_cuts_names(tmp_path: Path) -> None:
    src = make_densenet_like(tmp_path / "dense.onnx", blocks=3)
    env = {**os.environ, "COLUMNS": "80", "LINES": "24"}
    r = subprocess.run(
        [sys.executable, "-m", "bnfuse", str(src), "--dry-run", "--no-validate", "-v"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    for i in range(4):
        assert name(i, "norm1") in r.stdout
    for i in range(1, 4):
        assert name(i, "norm2") in r.stdout
    assert "…" not in r.stdout.split("Model before")[0]
