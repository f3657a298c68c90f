"""The report as one self-contained HTML page with charts (``--report FILE.html``).

The page needs nothing outside itself: styles and the small table script are inline,
charts are inline SVG drawn by matplotlib (:mod:`bnfuse.charts`, the ``html`` extra), and
a Content-Security-Policy forbids every network fetch, so it renders offline and as a CI
artifact. It says what the terminal and Markdown reports say (the size, validation,
latency and one-off cost tables come from the same sections of :mod:`bnfuse.report`),
and adds charts and a sortable, filterable table of every normalization.

:func:`write_html_summary` writes several results as one page per model plus an
``index.html`` that links them.
"""

from __future__ import annotations

import datetime
import html
import importlib.metadata
import importlib.util
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path

from bnfuse import report as _r
from bnfuse.backend import atomic_path
from bnfuse.bench import ORT_FOLDS_NOTE
from bnfuse.errors import UsageError
from bnfuse.model_info import describe
from bnfuse.options import require_html_extra
from bnfuse.report_assets import CSS, SCRIPT
from bnfuse.result import BenchResult, FuseResult, Validation

__all__ = ["require_extra", "summary_page", "to_html", "write_html", "write_html_summary"]

# no fetch of any kind: the page must render the same offline, years later
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
_E = html.escape


def require_extra() -> None:
    """Raise :class:`MissingDependencyError` (exit 4) unless matplotlib is installed."""
    require_html_extra()


def _charts() -> types.ModuleType:
    """:mod:`bnfuse.charts`, imported on first use (it imports matplotlib)."""
    require_extra()
    from bnfuse import charts

    return charts


# ------------------------------------------------------------------ page parts


def _page(title: str, body: str) -> str:
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{_E(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n"
        f"<footer>generated {generated} by bnfuse · one self-contained file</footer>\n"
        f"</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def _cell_html(cell: _r._Cell) -> str:
    text = _E(cell.text)
    if cell.code:
        text = f"<code>{text}</code>"
    cls = ""
    if "red" in cell.style:
        cls = "bad"
    elif "green" in cell.style:
        cls = "good"
    elif "yellow" in cell.style:
        cls = "warn"
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _section_table(sec: _r._Section, css: str = "") -> str:
    """A neutral report section (the same the terminal and Markdown print) as a table."""
    out = []
    if sec.headers:
        head = "".join(
            f'<th class="num">{_E(h)}</th>' if i in sec.right else f"<th>{_E(h)}</th>"
            for i, h in enumerate(sec.headers)
        )
        rows = "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>\n" for row in sec.rows)
        out.append(
            f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{rows}</tbody></table></div>"
        )
    return "\n".join(out)


def _lines(lines: Sequence[tuple[str, str]]) -> str:
    if not lines:
        return ""
    items = "".join(
        f'<li class="{"bad" if "red" in s else "warn" if "yellow" in s else ""}">{_E(t)}</li>'
        for t, s in lines
    )
    return f'<ul class="notes">{items}</ul>'


def _framework(result: FuseResult) -> str:
    names = ("onnx", "onnxruntime") if result.backend == "onnx" else ("keras", "tensorflow")
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _best(b: BenchResult | None) -> tuple[str, str]:
    """The largest paired speedup with its CI, and where it was measured."""
    if b is None or not b.rows:
        return "not measured", ""
    row = max(b.rows, key=lambda r: r.speedup)
    lo, hi = row.speedup_ci
    ci = f"{_r._ratio(row.speedup)} [{_r._ratio(lo)}, {_r._ratio(hi)}]"
    return ci, f"{row.runtime}, batch {row.batch}"


def _verdict(v: Validation | None, result: FuseResult) -> tuple[str, str]:
    if v is None:
        return ("skipped" if result.folds else "not needed (nothing folded)"), "warn"
    if v.passed:
        return "passed", "good"
    return "FAILED", "bad"


def _card(label: str, value: str, sub: str = "", css: str = "") -> str:
    cls = f"card {css}".strip()
    sub_html = f'<div class="sub">{sub}</div>' if sub else ""
    return f'<div class="{cls}"><div class="label">{_E(label)}</div><div class="value">{value}</div>{sub_html}</div>'


def _summary(result: FuseResult) -> str:
    text, style = _r._header(result)
    status_css = "bad" if "red" in style else "good" if "green" in style else "warn"
    n_left = len(result.refusals) + len(
        set(result.validation.rolled_back if result.validation else ())
        - {r.bn for r in result.refusals}
    )
    verdict, vcss = _verdict(result.validation, result)
    b, a = result.before, result.after
    params = f"{_r._int(b.params)} → {_r._int(a.params)}"
    params_sub = _E(_r._delta(b.params, a.params))
    if b.trainable_params is not None:
        params_sub += (
            f"<br>trainable {_r._int(b.trainable_params)} → {_r._int(a.trainable_params)}, "
            f"non-trainable {_r._int(b.non_trainable_params)} → "
            f"{_r._int(a.non_trainable_params)}"
        )
    cards = [
        _card(
            "model",
            f"<code>{_E(result.source)}</code>",
            _E(
                " · ".join(
                    p
                    for p in (result.backend.upper(), describe(result.source, result.backend))
                    if p
                )
            )
            + f"<br>installed: {_E(_framework(result))}",
        ),
        _card(
            "normalizations",
            f"{len(result.folds)} folded · {n_left} left",
            _E(f"BN nodes {_r._int(b.bn_nodes)} → {_r._int(a.bn_nodes)}"),
        ),
        _card("validation", _E(verdict), "", vcss),
        _card("best speedup", _E(_best(result.bench)[0]), _E(_best(result.bench)[1])),
        _card(
            "nodes / layers",
            f"{_r._int(b.nodes)} → {_r._int(a.nodes)}",
            _E(_r._delta(b.nodes, a.nodes)),
        ),
        _card("parameters", params, params_sub),
        _card(
            "file size",
            f"{_r._bytes(b.file_size)} → {_r._bytes(a.file_size)}",
            _E(_r._delta(b.file_size, a.file_size, size=True)),
        ),
    ]
    return (
        f'<p class="status {status_css}">{_E(text)}</p>\n'
        f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>\n'
        f"<h3>Model before → after</h3>{_section_table(_r._stats_section(b, a), 'compact')}"
        "</section>"
    )


def _bn_rows(result: FuseResult) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(status, [(cell text, sort key)]) per normalization, in graph order."""
    v = result.validation
    culprits = set(v.culprits) if v else set()
    rolled = set(v.rolled_back) if v else set()
    rows: list[tuple[str, list[tuple[str, str | None]]]] = []
    for f in result.folds:
        failed = f.bn in culprits
        status = "failed" if failed else "folded"
        result_text = f"folded {f.direction}" + (", FAILED validation" if failed else "")
        cells = [f.bn, f.kind, result_text, f.into, "", f.rule, f.scope or "main"]
        rows.append((status, [(c, None) for c in cells] + [(str(f.channels), str(f.channels))]))
    for r in result.refusals:
        code = str(getattr(r, "code", "") or "")
        status, reason = "refused", r.reason
        if r.bn in rolled:
            status, reason = "rolled-back", _r._ROLLED_BACK
        label = "rolled back" if status == "rolled-back" else "refused"
        cells = [r.bn, r.kind, label, reason, code, r.rule, r.scope or "main"]
        rows.append((status, [(c, None) for c in cells] + [("", "-1")]))
    done = {r.bn for r in result.refusals} | {f.bn for f in result.folds}
    for bn in sorted(rolled - done):
        cells = [bn, "", "rolled back", _r._ROLLED_BACK, "", "", ""]
        rows.append(("rolled-back", [(c, None) for c in cells] + [("", "-1")]))
    return rows


def _bn_section(result: FuseResult) -> str:
    rows = _bn_rows(result)
    n_fold = sum(1 for s, _ in rows if s in ("folded", "failed"))
    title = f"Normalizations: {n_fold} folded, {len(rows) - n_fold} left in place"
    if not rows:
        return (
            '<section id="normalizations"><h2>Normalizations</h2>'
            '<p class="warn">no BatchNormalization (or BN-equivalent affine) found</p></section>'
        )
    headers = ["#", "BN", "kind", "result", "into / reason", "code", "rule", "scope", "channels"]
    head = "".join(f'<th scope="col">{_E(h)}</th>' for h in headers)
    body = []
    css = {"folded": "good", "failed": "bad", "refused": "warn", "rolled-back": "warn"}
    for i, (status, cells) in enumerate(rows, 1):
        tds = [f'<td data-sort="{i}">{i}</td>']
        for j, (text, key) in enumerate(cells):
            is_name = j == 0 or (j == 3 and status in ("folded", "failed"))  # BN, into
            content = f"<code>{_E(text)}</code>" if is_name and text else _E(text)
            attrs = f' data-sort="{_E(key)}"' if key is not None else ""
            if j == 2:
                attrs += f' class="{css[status]}"'
            tds.append(f"<td{attrs}>{content}</td>")
        body.append(f'<tr data-status="{status}">{"".join(tds)}</tr>')
    statuses = sorted({s for s, _ in rows})
    options = "".join(f'<option value="{s}">{s}</option>' for s in statuses)
    return (
        f'<section id="normalizations"><h2>{_E(title)}</h2>\n'
        '<div class="filters" data-table="bn-table">'
        '<input type="search" class="filter-text" placeholder="filter by name, reason, rule…" '
        'aria-label="filter normalizations">'
        f'<select class="filter-status" aria-label="result"><option value="">all results</option>{options}</select>'
        f'<span class="count">{len(rows)} of {len(rows)} shown</span></div>\n'
        '<div class="scroll tall"><table id="bn-table" class="sortable">'
        f"<thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
        '<p class="hint">click a column header to sort; the filter matches any column</p>'
        "</section>"
    )


def _validation_section(result: FuseResult, salt: str) -> str:
    v = result.validation
    if v is None:
        why = (
            "validation was skipped (--no-validate)"
            if result.folds
            else "nothing was folded, so there is nothing to compare"
        )
        return (
            f'<section id="validation"><h2>Validation</h2><p class="warn">{_E(why)}</p></section>'
        )
    sec = _r._validation_section(v, verbose=True)
    chart = _charts().validation_chart(v.outputs, f"{salt}-validation")
    css = "good" if v.passed else "bad"
    return (
        f'<section id="validation"><h2 class="{css}">{_E(sec.title)}</h2>\n'
        f"{_section_table(sec)}{_lines(sec.lines)}\n"
        + (
            f"<figure>{chart}<figcaption>error against tolerance per output</figcaption></figure>"
            if chart
            else ""
        )
        + "</section>"
    )


def _machine(b: BenchResult) -> str:
    labels = {
        "cpu": "CPU",
        "logical_cores": "logical cores",
        "usable_cores": "usable cores",
        "arch": "architecture",
        "os": "OS",
        "python": "Python",
        "numpy": "numpy",
        "onnxruntime": "onnxruntime",
        "tensorflow": "tensorflow",
    }
    rows = [(labels.get(k, k), v) for k, v in b.machine.items() if v not in (None, "")]
    rows.append(("threads", b.threads))
    if b.providers:
        rows.append(("execution providers", ", ".join(b.providers)))
    body = "".join(f"<tr><th>{_E(str(k))}</th><td>{_E(str(v))}</td></tr>" for k, v in rows)
    return f'<h3>Machine</h3><table class="compact kv"><tbody>{body}</tbody></table>'


def _no_bench(result: FuseResult) -> str:
    skipped = [w for w in result.warnings if w.startswith("benchmark skipped")]
    why = (
        skipped[0]
        if skipped
        else "latency was not measured: run with --bench (e.g. --bench --batch 1,32) to time "
        "the original against the fused model"
    )
    return f'<section id="latency"><h2>Latency</h2><p class="warn">{_E(why)}</p></section>'


def _latency_section(result: FuseResult, salt: str) -> str:
    b = result.bench
    if b is None:
        return _no_bench(result)
    charts = _charts()
    secs = _r._bench_sections(b, verbose=False)  # the charts show the spread
    main, rest = secs[0], secs[1:]
    # the machine gets its own table and the runtime note its own box, below
    lines = [
        (t, s) for t, s in main.lines if not t.startswith("machine: ") and ORT_FOLDS_NOTE not in t
    ]
    parts = [f'<section id="latency"><h2>{_E(main.title)}</h2>']
    if b.providers:
        parts.append(
            f"<p>onnxruntime execution providers timed: <b>{_E(', '.join(b.providers))}</b> "
            "(validation ran on the CPU provider with graph optimizations disabled)</p>"
        )
    dist = charts.latency_chart(b.rows, f"{salt}-latency")
    if dist:
        parts.append(
            f"<figure>{dist}<figcaption>every timed run of the original (grey) and fused (blue) "
            "model: violin for the shape, box for the quartiles, line for the median"
            "</figcaption></figure>"
        )
    elif b.rows:
        parts.append(
            '<p class="warn">raw timings not kept in this result: no distribution chart</p>'
        )
    speed = charts.speedup_chart(b.rows, f"{salt}-speedup")
    if speed:
        parts.append(
            f"<figure>{speed}<figcaption>median of the paired original/fused ratios with its "
            "bootstrap 95% confidence interval (green: faster, red: slower, grey: "
            "no clear change)</figcaption></figure>"
        )
    parts.append(_section_table(main, "wide") + _lines(lines))
    if ORT_FOLDS_NOTE in b.notes:
        parts.append(f'<p class="note"><b>runtime note:</b> {_E(ORT_FOLDS_NOTE)}</p>')
    for sec in rest:
        parts.append(f"<h3>{_E(sec.title)}</h3>" + _section_table(sec, "compact"))
    parts.append(_machine(b))
    parts.append("</section>")
    return "\n".join(parts)


def _notes(result: FuseResult) -> str:
    lines = [(f"warning: {w}", "yellow") for w in result.warnings]
    if result.bench is not None:
        lines += [(f"note: {n}", "") for n in result.bench.notes if n != ORT_FOLDS_NOTE]
    if not lines:
        return ""
    return f'<section id="notes"><h2>Notes</h2>{_lines(lines)}</section>'


def _model_body(result: FuseResult, salt: str, nav: str = "") -> str:
    name = Path(result.source).name or result.source
    return "\n".join(
        [
            nav,
            f"<h1>bnfuse report: {_E(name)}</h1>",
            _summary(result),
            _bn_section(result),
            _validation_section(result, salt),
            _latency_section(result, salt),
            _notes(result),
        ]
    )


# ------------------------------------------------------------------ public


def to_html(result: FuseResult, *, nav: str = "") -> str:
    """The report of one result as a self-contained HTML page.

    ``nav`` is HTML put above the title (the multi-model summary links back with it).

    Raises:
        MissingDependencyError: matplotlib (the ``html`` extra) is not installed.
    """
    _charts()
    name = Path(result.source).name or result.source
    return _page(f"bnfuse report: {name}", _model_body(result, "m", nav))


def _check_dest(dest: Path) -> None:
    if not dest.parent.is_dir():
        raise UsageError(f"--report {dest}: directory {dest.parent} does not exist")
    if dest.is_dir():
        raise UsageError(f"--report {dest}: is a directory")


def _write(dest: Path, content: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(content, encoding="utf-8")


def write_html(result: FuseResult, path: str | os.PathLike[str]) -> None:
    """Write :func:`to_html` to ``path`` atomically."""
    dest = Path(path)
    _check_dest(dest)
    _write(dest, to_html(result))


def _slug(source: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem or "model").strip("-.") or "model"
    name, n = stem, 2
    while name.lower() in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name.lower())
    return name


def _summary_row(result: FuseResult, page: str) -> str:
    verdict, vcss = _verdict(result.validation, result)
    b, a = result.before, result.after
    n_left = len(result.refusals)
    cells = [
        f'<td><a href="{_E(page)}"><code>{_E(result.source)}</code></a></td>',
        f"<td>{_E(result.backend)}</td>",
        f'<td data-sort="{len(result.folds)}">{len(result.folds)}</td>',
        f'<td data-sort="{n_left}">{n_left}</td>',
        f'<td data-sort="{b.params}">{_r._int(b.params)} → {_r._int(a.params)}</td>',
        f'<td class="{vcss}">{_E(verdict)}</td>',
        f"<td>{_E(' '.join(_best(result.bench)))}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def write_html_summary(results: Sequence[FuseResult], directory: str | os.PathLike[str]) -> Path:
    """Write one page per result and an ``index.html`` summary linking them into
    ``directory`` (created if its parent exists); returns the index's path.

    Pages are named after the models (``resnet50.html``, a counter added on clashes)
    and link back to the index; every page is self-contained on its own.

    Raises:
        UsageError: no results, or ``directory`` cannot be made.
        MissingDependencyError: matplotlib (the ``html`` extra) is not installed.
    """
    if not results:
        raise UsageError("no results to report")
    require_extra()
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: not a directory")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: directory {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    used = {"index"}
    pages = []
    nav = '<nav><a href="index.html">← all models</a></nav>'
    for i, result in enumerate(results):
        page = _slug(result.source, used) + ".html"
        name = Path(result.source).name or result.source
        body = _model_body(result, f"m{i}", nav)
        _write(out / page, _page(f"bnfuse report: {name}", body))
        pages.append(page)
    index = out / "index.html"
    _write(index, summary_page(list(zip(results, pages, strict=True))))
    return index


def summary_page(entries: Sequence[tuple[FuseResult, str]], failures: int = 0) -> str:
    """The summary page of several models: one sortable row per ``(result, page)``, the
    model linking to its own page (a relative file name). ``failures`` counts models
    that gave no result at all (unreadable, skipped), named in the headline."""
    results = [r for r, _ in entries]
    rows = [_summary_row(r, page) for r, page in entries]
    head = "".join(
        f"<th>{h}</th>"
        for h in ("model", "format", "folded", "left", "parameters", "validation", "best speedup")
    )
    failed = sum(1 for r in results if not r.ok)
    total = len(results) + failures
    extra = f"; {failures} gave no result (see summary.md)" if failures else ""
    body = (
        f"<h1>bnfuse report: {total} models</h1>\n"
        f'<p class="status {"bad" if failed or failures else "good"}">'
        f"{len(results) - failed} of {total} passed validation or needed none{extra}</p>\n"
        '<div class="scroll"><table class="sortable" id="models-table">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
    return _page("bnfuse report: summary", body)
