"""Turn a :class:`~bnfuse.result.FuseResult` into a terminal report, Markdown or JSON.

This is the only module that formats results. The terminal and Markdown reports are built
from the same list of sections, so they always say the same things; the JSON report is
``result.to_dict()`` (schema ``bnfuse.result/1``, documented in ``docs/report-schema.md``)
with non-finite numbers written as ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnfuse.bench import ORT_FOLDS_NOTE
from bnfuse.report_stats import stats_sections
from bnfuse.result import BenchResult, FuseResult, ModelStats, Validation

__all__ = ["SCHEMA", "render", "to_json", "to_markdown"]

SCHEMA = "bnfuse.result/1"

# ------------------------------------------------------------------ number formatting


def _bad(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def _sci(x: float | None) -> str:
    """An error or tolerance: ``0``, ``3.1e-06``."""
    if x is None or not math.isfinite(x):
        return _bad(x)
    return "0" if x == 0 else f"{x:.2g}" if 1e-3 <= abs(x) < 1e3 else f"{x:.1e}"


def _cos(x: float | None) -> str:
    """Cosine similarity; values within 1e-3 of 1 as ``1-2.3e-08`` so they stay readable."""
    if x is None or not math.isfinite(x):
        return _bad(x)
    if x == 1.0:
        return "1"
    if 0.999 < x < 1.0:
        return f"1-{1.0 - x:.1e}"
    return f"{x:.4f}"


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return _bad(x)
    return f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return _bad(x)
    if x < 0.01:
        return f"{x:.4f}"
    if x < 10:
        return f"{x:.3f}"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return _bad(x)
    return f"{x:.2f}x"


def _rate(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return _bad(x)
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _int(x: int | None) -> str:
    return "—" if x is None else f"{x:,}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def _delta(before: int | None, after: int | None, size: bool = False) -> str:
    if before is None or after is None:
        return ""
    d = after - before
    if d == 0:
        return "0"
    text = _bytes(abs(d)) if size else f"{abs(d):,}"
    pct = f" ({100 * d / before:+.1f}%)" if before else ""
    return ("+" if d > 0 else "-") + text + pct


# ------------------------------------------------------------------ neutral sections


@dataclass(frozen=True)
class _Cell:
    text: str
    style: str = ""
    code: bool = False  # a model identifier: `code` in Markdown


def _c(text: str, style: str = "") -> _Cell:
    return _Cell(text, style)


def _name(text: str) -> _Cell:
    return _Cell(text, "cyan", code=True)


@dataclass
class _Section:
    title: str
    headers: tuple[str, ...] = ()
    rows: list[tuple[_Cell, ...]] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)  # (text, style), after the table
    right: frozenset[int] = frozenset()  # right-aligned (numeric) columns


def _header(result: FuseResult) -> tuple[str, str]:
    src = result.source
    if result.dry_run:
        dest, status, style = (
            result.output_path or "(no output)",
            "dry run: nothing written",
            "yellow",
        )
    elif result.written:
        dest, status, style = result.output_path or "?", "written", "green"
    elif result.output_path is None:
        dest, status, style = "(no output)", "nothing written", ""
    elif not result.ok:
        dest, status, style = result.output_path, "not written: validation failed", "bold red"
    else:
        dest, status, style = result.output_path, "not written", "yellow"
    version = f" {result.bnfuse_version}" if result.bnfuse_version else ""
    kind = f"{result.backend}: {result.framework}" if result.framework else result.backend
    return f"bnfuse{version} [{kind}]: {src} → {dest} ({status})", style


_ROLLED_BACK = "its fold failed validation; left in place"


def _bn_section(result: FuseResult, verbose: bool) -> _Section:
    v = result.validation
    culprits = set(v.culprits) if v else set()
    rolled = set(v.rolled_back) if v else set()
    has_scope = any(f.scope for f in result.folds) or any(r.scope for r in result.refusals)
    headers = ["BN", "kind", "result", "into / reason", "rule"]
    if has_scope:
        headers.append("scope")
    if verbose:
        headers += ["channels", "detail"]
    rows: list[tuple[_Cell, ...]] = []
    for f in result.folds:
        status = f"folded {f.direction}"
        style = "green"
        if f.bn in culprits:
            status, style = f"folded {f.direction}, FAILED validation", "bold red"
        row = [_name(f.bn), _c(f.kind), _c(status, style), _name(f.into), _c(f.rule)]
        if has_scope:
            row.append(_c(f.scope or "main"))
        if verbose:
            row += [_c(str(f.channels)), _c(f.detail)]
        rows.append(tuple(row))
    refused = {r.bn for r in result.refusals}
    for r in result.refusals:
        status, style, reason = "refused", "yellow", r.reason
        if r.bn in rolled:
            status, style, reason = "rolled back", "bold yellow", _ROLLED_BACK
        row = [_name(r.bn), _c(r.kind), _c(status, style), _c(reason), _c(r.rule)]
        if has_scope:
            row.append(_c(r.scope or "main"))
        if verbose:
            row += [_c(""), _c("")]
        rows.append(tuple(row))
    for bn in sorted(rolled - refused - {f.bn for f in result.folds}):
        row = [
            _name(bn),
            _c(""),
            _c("rolled back", "bold yellow"),
            _c(_ROLLED_BACK),
            _c(""),
        ]
        if has_scope:
            row.append(_c(""))
        if verbose:
            row += [_c(""), _c("")]
        rows.append(tuple(row))
    n_bn = len(rows)
    title = (
        f"Normalizations: {len(result.folds)} folded, {n_bn - len(result.folds)} left in place"
        if n_bn
        else "Normalizations"
    )
    sec = _Section(title, tuple(headers), rows)
    if not n_bn:
        sec.lines.append(("no BatchNormalization (or BN-equivalent affine) found", "yellow"))
    return sec


def _stats_section(before: ModelStats, after: ModelStats) -> _Section:
    sec = _Section(
        "Model before → after", ("", "before", "after", "change"), right=frozenset({1, 2, 3})
    )
    items: list[tuple[str, int | None, int | None, bool]] = [
        ("nodes / layers", before.nodes, after.nodes, False),
        ("BN nodes", before.bn_nodes, after.bn_nodes, False),
        ("parameters", before.params, after.params, False),
    ]
    if before.trainable_params is not None or after.trainable_params is not None:
        items.append(("trainable", before.trainable_params, after.trainable_params, False))
    if before.non_trainable_params is not None or after.non_trainable_params is not None:
        items.append(
            ("non-trainable", before.non_trainable_params, after.non_trainable_params, False)
        )
    if before.file_size is not None or after.file_size is not None:
        items.append(("file size", before.file_size, after.file_size, True))
    for label, b, a, is_size in items:
        fmt = _bytes if is_size else _int
        sec.rows.append((_c(label), _c(fmt(b)), _c(fmt(a)), _c(_delta(b, a, is_size))))
    return sec


def _validation_section(v: Validation, verbose: bool) -> _Section:
    verdict = "passed" if v.passed else "FAILED"
    title = f"Validation {verdict}: {v.runtime}, {v.samples} run(s), inputs: {v.input_source}"
    headers = ["output", "dtype"]
    headers += ["shape", "max abs", "max rel", "mean abs"] if verbose else ["max abs", "max rel"]
    headers += ["cosine", "top-1", "min atol", "rtol / atol", "result"]
    sec = _Section(title, tuple(headers), right=frozenset(range(2, len(headers) - 1)))
    for o in v.outputs:
        label = _name(o.name) if not o.fused_name else _c(f"{o.name} (fused: {o.fused_name})")
        result = (
            _c("pass", "green")
            if o.passed
            else _c("FAIL" + (f": {o.reason}" if o.reason else ""), "bold red")
        )
        row = [label, _c(o.dtype or "?")]
        if verbose:
            row.append(_c("x".join(map(str, o.shape)) if o.shape else "scalar"))
        row += [_c(_sci(o.max_abs_error)), _c(_sci(o.max_rel_error))]
        if verbose:
            row.append(_c(_sci(o.mean_abs_error)))
        row += [
            _c(_cos(o.cosine_similarity)),
            _c(_pct(o.top1_agreement)),
            _c(_sci(o.min_atol)),
            _c(f"{_sci(o.rtol)} / {_sci(o.atol)}"),
            result,
        ]
        sec.rows.append(tuple(row))
    if v.culprits:
        sec.lines.append(
            ("responsible fold(s) found by bisection: " + ", ".join(v.culprits), "bold red")
        )
    if v.rolled_back:
        sec.lines.append(("rolled back: " + ", ".join(v.rolled_back), "yellow"))
    return sec


def _bench_sections(b: BenchResult, verbose: bool) -> list[_Section]:
    headers = [
        "runtime",
        "batch",
        "original median ms",
        "orig p90",
        "fused median ms",
        "fused p90",
        "speedup [95% CI]",
        "throughput /s orig → fused",
        "runs",
    ]
    if verbose:
        headers[4:4] = ["orig p99", "orig mean ± std"]
        headers[8:8] = ["fused p99", "fused mean ± std"]
    title = f"Latency ({b.threads} thread(s)"
    if b.providers:
        title += ", providers " + ", ".join(b.providers)
    title += f", {b.seconds:g} s timing budget)" if b.seconds else ")"
    sec = _Section(title, tuple(headers), right=frozenset(range(1, len(headers))))
    for row in b.rows:
        o, f = row.original, row.fused
        lo, hi = row.speedup_ci
        style = "green" if lo > 1.0 else "red" if hi < 1.0 else ""
        cells = [_c(row.runtime), _c(str(row.batch)), _c(_ms(o.median_ms)), _c(_ms(o.p90_ms))]
        if verbose:
            cells += [_c(_ms(o.p99_ms)), _c(f"{_ms(o.mean_ms)} ± {_ms(o.std_ms)}")]
        cells += [_c(_ms(f.median_ms)), _c(_ms(f.p90_ms))]
        if verbose:
            cells += [_c(_ms(f.p99_ms)), _c(f"{_ms(f.mean_ms)} ± {_ms(f.std_ms)}")]
        cells += [
            _c(f"{_ratio(row.speedup)} [{_ratio(lo)}, {_ratio(hi)}]", style),
            _c(f"{_rate(o.throughput)} → {_rate(f.throughput)}"),
            _c(f"{o.runs}+{f.runs}"),
        ]
        sec.rows.append(tuple(cells))
    if ORT_FOLDS_NOTE in b.notes:  # right under the table: it qualifies its numbers
        sec.lines.append((f"note: {ORT_FOLDS_NOTE}", ""))
    for row in b.rows:
        if row.note:
            sec.lines.append((f"{row.runtime}: {row.note}", "dim"))
    if not b.rows:
        sec.lines.append(("no latency rows (see notes)", "yellow"))
    out = [sec]
    if b.setup_ms or b.first_run_ms:
        once = _Section("One-off costs", ("what", "ms"), right=frozenset({1}))
        for key, ms in b.setup_ms.items():
            once.rows.append((_c(f"setup {key}"), _c(_ms(ms))))
        for key, ms in b.first_run_ms.items():
            once.rows.append((_c(f"first run {key}"), _c(_ms(ms))))
        out.append(once)
    m = b.machine
    parts = [
        str(m.get("cpu") or "unknown CPU"),
        f"{m.get('logical_cores')} logical cores" if m.get("logical_cores") else "",
        f"{m.get('usable_cores')} usable" if m.get("usable_cores") else "",
        str(m.get("os") or ""),
        f"Python {m['python']}" if m.get("python") else "",
        f"numpy {m['numpy']}" if m.get("numpy") else "",
        f"onnxruntime {m['onnxruntime']}" if m.get("onnxruntime") else "",
        f"tensorflow {m['tensorflow']}" if m.get("tensorflow") else "",
    ]
    sec.lines.append(("machine: " + ", ".join(p for p in parts if p), "dim"))
    return out


def _sections(result: FuseResult, verbose: bool) -> list[_Section]:
    secs = [_bn_section(result, verbose), _stats_section(result.before, result.after)]
    if result.validation is not None:
        secs.append(_validation_section(result.validation, verbose))
    elif result.folds:
        secs.append(_Section("Validation", lines=[("validation skipped", "yellow")]))
    secs.extend(stats_sections(result, verbose, _Section, _Cell))
    if result.bench is not None:
        secs.extend(_bench_sections(result.bench, verbose))
    notes = _Section("Notes")
    for w in result.warnings:
        notes.lines.append((f"warning: {w}", "yellow"))
    if result.bench is not None:
        for n in result.bench.notes:
            if n != ORT_FOLDS_NOTE:  # said under the latency table
                notes.lines.append((f"note: {n}", ""))
    if notes.lines:
        secs.append(notes)
    return secs


# ------------------------------------------------------------------ terminal


def render(result: FuseResult, console: Console, *, verbose: bool = False) -> None:
    """Print the report: header, BNs, model size, validation, latency, notes.

    By default BNs are grouped to fit a screen (:mod:`bnfuse.compact`); ``verbose`` lists
    every BN with its full name and adds fold details, output shapes, mean errors, p99,
    mean ± std and the one-off costs table.
    """
    from bnfuse import compact  # BNs grouped to fit a screen, or every BN's full name (-v)

    text, style = _header(result)
    console.print(Text(text, style=style or "bold"))
    console.print()
    for line, lstyle in compact.bn_lines(result, verbose):
        console.print(Text(line, style=lstyle), soft_wrap=True)
    secs = _sections(result, verbose)[1:]
    for sec in secs if verbose else compact.compact_latency(secs):
        console.print()
        console.print(Text(sec.title, style="bold"))
        if sec.headers:
            table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
            for i, h in enumerate(sec.headers):
                table.add_column(h, justify="right" if i in sec.right else "left")
            for row in sec.rows:
                table.add_row(*(Text(c.text, style=c.style) for c in row))
            console.print(table)
        for line, lstyle in sec.lines:
            console.print(Text(line, style=lstyle))


# ------------------------------------------------------------------ Markdown


def _md_escape(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\n", " ")
    )


def _md_cell(cell: _Cell) -> str:
    if not cell.text:
        return ""
    if cell.code:
        fence, pad = ("``", " ") if "`" in cell.text else ("`", "")
        body = cell.text.replace("|", "\\|").replace("\n", " ")
        return f"{fence}{pad}{body}{pad}{fence}"
    text = _md_escape(cell.text)
    return f"**{text}**" if "bold" in cell.style else text


def _md_table(
    headers: Sequence[str], rows: Sequence[Sequence[_Cell]], right: frozenset[int]
) -> list[str]:
    out = ["| " + " | ".join(_md_escape(h) or " " for h in headers) + " |"]
    out.append("|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|")
    for row in rows:
        out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return out


def to_markdown(result: FuseResult, *, verbose: bool = False) -> str:
    """The report as GitHub-flavoured Markdown (same content as :func:`render`)."""
    text, _ = _header(result)
    lines = [f"# {_md_escape(text)}", ""]
    for sec in _sections(result, verbose):
        lines += [f"## {_md_escape(sec.title)}", ""]
        if sec.headers:
            lines += _md_table(sec.headers, sec.rows, sec.right)
            lines.append("")
        if sec.lines:
            lines += [f"- {_md_escape(t)}" for t, _ in sec.lines]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------ JSON


def _finite(obj: Any) -> Any:
    """Replace NaN and ±inf (anywhere in a JSON-ready structure) by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(result: FuseResult) -> str:
    """``result.to_dict()`` as indented JSON with sorted keys; non-finite numbers are null."""
    return json.dumps(_finite(result.to_dict()), indent=2, sort_keys=True, allow_nan=False)
