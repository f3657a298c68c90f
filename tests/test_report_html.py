"""The HTML report: content, self-containment, the ``html`` extra, several models.

The rendered page in a real browser is checked by ``tests/test_report_browser.py``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_report import full_result
from typer.testing import CliRunner

from bnfuse import bench, report_files, report_html
from bnfuse.backend import BenchTarget, InputSpec
from bnfuse.bench import ORT_FOLDS_NOTE
from bnfuse.cli import app
from bnfuse.errors import MissingDependencyError, UsageError
from bnfuse.result import FuseResult, LatencyRow, Refusal

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"

#: a resource the page would fetch: src/href/url()/@import pointing off the page (a
#: ``data:`` URI is inline, so allowed)
_EXTERNAL = re.compile(
    r"""(?:\b(?:src|href|xlink:href|action|poster|data)\s*=\s*["']?\s*(?:(?!data:)[a-z][a-z0-9+.-]*:|//))"""
    r"""|url\(\s*["']?\s*(?:(?!data:)[a-z][a-z0-9+.-]*:|//)|@import""",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class CodedRefusal(Refusal):
    """A refusal with the reason code that another branch adds to ``Refusal`` itself."""

    code: str = ""


def with_timings(result: FuseResult) -> FuseResult:
    """``full_result()`` whose latency rows kept their raw timings (as bench.run does)."""
    assert result.bench is not None
    rng = np.random.default_rng(0)
    rows = []
    for row in result.bench.rows:
        o = row.original.median_ms * (1 + 0.1 * rng.standard_exponential(row.original.runs))
        f = row.fused.median_ms * (1 + 0.1 * rng.standard_exponential(row.fused.runs))
        rows.append(dataclasses.replace(row, original_ms=tuple(o), fused_ms=tuple(f)))
    return dataclasses.replace(
        result,
        bench=dataclasses.replace(
            result.bench, rows=tuple(rows), providers=("CPUExecutionProvider",)
        ),
    )


def external_references(page: str) -> list[str]:
    """Every way ``page`` could reach outside itself: resources and any URL at all."""
    found = [m.group(0) for m in _EXTERNAL.finditer(page)]
    found += re.findall(r"https?:", page, flags=re.IGNORECASE)
    return found


def test_page_names_every_bn_and_has_every_section() -> None:
    r = with_timings(full_result())
    r = dataclasses.replace(
        r,
        refusals=(
            CodedRefusal("bn2", "excluded (rolled back)", rule="conv_bn", code="excluded"),
            CodedRefusal("bn|weird<name>", "the Conv output has 2 consumers", code="shared-output"),
        ),
    )
    page = report_html.to_html(r)
    for name in ("bn1", "bn3", "bn2", "bn|weird<name>"):
        assert f"<code>{html.escape(name)}</code>" in page, name
    assert "bn|weird<name>" not in page  # escaped, never raw markup
    assert ">shared-output<" in page and ">excluded<" in page  # refusal codes in the table
    assert ">folded forward<" in page and "<code>fc</code>" in page  # direction and into
    for section in ("summary", "normalizations", "validation", "latency", "notes"):
        assert f'<section id="{section}">' in page
    # validation chart, latency distributions, paired speedup
    assert page.count('<svg role="img" class="chart"') == 3
    assert "Validation FAILED" in page and "responsible fold(s) found by bisection: bn2" in page
    assert "Test CPU 9000" in page and "CPUExecutionProvider" in page
    assert page.count(html.escape(ORT_FOLDS_NOTE)) == 1  # said once, in its own box
    assert "1.50x [1.40x, 1.60x]" in page  # best speedup with its CI
    assert "trainable 900 → 900, non-trainable 100 → 0" in page
    assert "40,960 B" not in page and "40.0 KiB → 36.0 KiB" in page
    assert "setup onnxruntime ORT_DISABLE_ALL original" in page  # one-off costs
    assert "first run onnxruntime ORT_DISABLE_ALL original batch=1" in page


def test_page_is_self_contained() -> None:
    page = report_html.to_html(with_timings(full_result()))
    assert external_references(page) == []
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'' in page
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    # the checker itself catches what it must
    for bad in (
        '<img src="https://x/y.png">',
        "<script src='//cdn/x.js'>",
        "<a href=http://x>",
        "<style>@import 'a.css'</style>",
        'style="background:url(//x/a.png)"',
    ):
        assert external_references(bad), bad


def test_charts_keep_their_ids_apart() -> None:
    """Several inline SVGs share one document: a repeated id would clip one chart with
    another's clip path."""
    page = report_html.to_html(with_timings(full_result()))
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) > 10
    assert len(ids) == len(set(ids)), [i for i in set(ids) if ids.count(i) > 1]


def test_failed_validation_and_no_bench_still_render() -> None:
    skipped = "benchmark skipped: validation failed (--force writes and times it anyway)"
    r = full_result(bench=None, written=False, warnings=(skipped,))
    page = report_html.to_html(r)
    assert "Validation FAILED" in page and "<svg" in page  # the validation chart
    latency = page.split('<section id="latency">')[1].split("</section>")[0]
    assert skipped in latency and "<svg" not in latency

    page = report_html.to_html(full_result(bench=None))
    latency = page.split('<section id="latency">')[1].split("</section>")[0]
    assert "latency was not measured: run with --bench" in latency

    page = report_html.to_html(full_result(bench=None, validation=None, folds=(), refusals=()))
    assert "no BatchNormalization" in page and "nothing was folded" in page


def test_rows_without_raw_timings_say_so() -> None:
    page = report_html.to_html(full_result())  # rows made without original_ms / fused_ms
    assert "raw timings not kept" in page
    assert page.count('<svg role="img" class="chart"') == 2  # validation + speedup


def test_bench_keeps_raw_timings_out_of_the_json() -> None:
    w = np.ones((8, 8), np.float32)

    def target(side: str) -> BenchTarget:
        return BenchTarget("fake", lambda: lambda feeds: feeds["x"] @ w)

    res = bench.run(
        [target("o")],
        [target("f")],
        [InputSpec("x", np.dtype(np.float32), ("N", 8))],
        batches=(1,),
        threads=1,
        seconds=0.05,
        input_shapes={},
        progress=None,
    )
    row: LatencyRow = res.rows[0]
    assert len(row.original_ms) == row.original.runs == len(row.fused_ms) > 0
    assert min(row.original_ms) == pytest.approx(row.original.min_ms)
    assert float(np.median(row.fused_ms)) == pytest.approx(row.fused.median_ms)
    data = dataclasses.replace(full_result(), bench=res).to_dict()
    assert "original_ms" not in json.dumps(data) and "fused_ms" not in data["bench"]["rows"][0]


def test_write_report_dispatches_html_atomically(tmp_path: Path) -> None:
    dest = tmp_path / "r.HTML"
    report_files.write_report(with_timings(full_result()), dest)
    text = dest.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.HTML"]
    report_files.check_report_path(tmp_path / "r.markdown")  # accepted
    with pytest.raises(UsageError, match=r"\.md, \.json or \.html"):
        report_files.check_report_path(tmp_path / "r.txt")


def _no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kw: object) -> object:
        return None if name == "matplotlib" else real(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_extra_is_exit_4_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_matplotlib(monkeypatch)
    with pytest.raises(MissingDependencyError, match=r"bnfuse\[html\]"):
        report_html.to_html(full_result())
    out = tmp_path / "f.onnx"
    res = CliRunner().invoke(
        app,
        [str(SAMPLES / "digits_cnn_bn.onnx"), "-o", str(out), "--report", str(tmp_path / "r.html")],
    )
    assert res.exit_code == 4, res.output
    assert 'pip install "bnfuse[html]"' in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # refused before fusing: nothing written


def test_import_bnfuse_does_not_import_matplotlib() -> None:
    code = (
        "import sys, bnfuse, bnfuse.api, bnfuse.report, bnfuse.cli; "
        "print(sorted(m for m in ('matplotlib', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_cli_writes_an_html_report_for_an_onnx_model(tmp_path: Path) -> None:
    dest = tmp_path / "r.html"
    args = [str(SAMPLES / "digits_cnn_bn.onnx"), "--dry-run", "--report", str(dest)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    page = dest.read_text(encoding="utf-8")
    for bn in ("bn_1", "bn_2", "bn_3", "bn_4"):
        assert f"<code>{bn}</code>" in page
    assert "latency was not measured" in page and external_references(page) == []
    assert "ONNX · IR " in page and "written by bnfuse" in page  # the file's own header


def test_summary_of_several_models(tmp_path: Path) -> None:
    a = with_timings(full_result())
    b = full_result(source="other/resnet.onnx", bench=None, validation=None)
    c = full_result(source="digits_mlp.keras", backend="keras")
    index = report_html.write_html_summary([a, b, c], tmp_path / "site")
    files = sorted(p.name for p in (tmp_path / "site").iterdir())
    assert index == tmp_path / "site" / "index.html"
    assert files == ["digits_mlp.html", "index.html", "resnet-2.html", "resnet.html"]
    text = index.read_text(encoding="utf-8")
    for page in ("resnet.html", "resnet-2.html", "digits_mlp.html"):
        assert f'href="{page}"' in text
        sub = (tmp_path / "site" / page).read_text(encoding="utf-8")
        assert 'href="index.html"' in sub and external_references(sub) == []
    assert "models/resnet.onnx" in text and "other/resnet.onnx" in text
    assert "1 of 3 passed validation or needed none" in text  # full_result() fails
    assert external_references(text) == []
    with pytest.raises(UsageError):
        report_html.write_html_summary([], tmp_path / "empty")
    with pytest.raises(UsageError, match="does not exist"):
        report_html.write_html_summary([a], tmp_path / "no" / "site")


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_cnn_bn.onnx"])
def test_onnx_header_is_read_without_parsing_the_graph(name: str) -> None:
    import onnx

    from bnfuse.model_info import describe

    m = onnx.load(str(SAMPLES / name))
    text = describe(str(SAMPLES / name), "onnx")
    assert text.startswith(f"IR {m.ir_version} · ")
    for o in m.opset_import:
        assert (f"{o.domain} {o.version}" if o.domain else f"opset {o.version}") in text
    assert text.endswith(f"written by {m.producer_name} {m.producer_version}".strip())


def test_keras_version_and_unreadable_files(tmp_path: Path) -> None:
    import zipfile

    from bnfuse.model_info import describe

    with zipfile.ZipFile(SAMPLES / "digits_cnn.keras") as z:
        version = json.loads(z.read("metadata.json"))["keras_version"]
    assert describe(str(SAMPLES / "digits_cnn.keras"), "keras") == f"saved by Keras {version}"
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    for bad in ("empty.onnx", "junk.onnx", "missing.onnx"):
        assert describe(str(tmp_path / bad), "onnx") == ""
    assert describe(str(tmp_path / "junk.keras"), "keras") == ""
    assert describe("KerasModel", "keras") == ""  # an in-memory model's class name
