"""``bnfuse MODEL... -o DIR``: several models in one run (the CLI side of
:func:`bnfuse.many.fuse_many`): one progress bar, errors as they happen, a summary table,
JSON Lines with ``--json``, a report directory with one report per model plus a summary.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnfuse import cli_common as _common
from bnfuse.backend import atomic_path
from bnfuse.cli_common import FLAGS, options_from
from bnfuse.compact import aligned
from bnfuse.many import ModelRun, fuse_many, worst_exit_code
from bnfuse.options import OptionError, html_available, report_format

__all__ = [
    "SUMMARY_SCHEMA",
    "aligned",
    "run_many",
    "summary_dict",
    "summary_markdown",
    "summary_rows",
]

SUMMARY_SCHEMA = "bnfuse.summary/1"
ERROR_SCHEMA = "bnfuse.error/1"  # a JSON Lines entry for a model that has no result


def _report_dir(reports: Sequence[Path]) -> Path | None:
    if not reports:
        return None
    files = [r for r in reports if report_format(r) is not None]
    if files or len(reports) > 1:
        raise OptionError(
            "reports", "with several models, give one directory (one report per model + summary)"
        )
    return reports[0]


def _validation(run: ModelRun) -> str:
    r = run.result
    if r is None:
        return "—"
    if r.validation is None:
        return "skipped" if r.folds else "—"
    if r.validation.rolled_back:
        return "passed after rollback" if r.validation.passed else "FAILED"
    return "passed" if r.validation.passed else "FAILED"


def summary_rows(runs: Sequence[ModelRun]) -> list[tuple[str, str, str, str, str, str]]:
    """One row per model: model, BNs folded, BNs left, validation, seconds, output/error."""
    rows = []
    for run in runs:
        r = run.result
        folded = str(len(r.folds)) if r is not None else "—"
        left = str(len(r.refusals)) if r is not None else "—"
        if run.status == "skipped":
            where = "skipped (--fail-fast)"
        elif run.exit_code:
            where = f"error {run.exit_code}: {run.error}"
        elif run.output:
            where = run.output
        else:
            where = "dry run" if r is not None and r.dry_run else "(not written)"
        rows.append((run.source, folded, left, _validation(run), f"{run.seconds:.2f}", where))
    return rows


HEADERS = ("model", "folded", "left", "validation", "time s", "output")


def _error_line(run: ModelRun) -> str:
    text = run.error
    if run.param:  # an option the API named: say the flag
        text = f"{FLAGS.get(run.param, run.param)}: {text.split(': ', 1)[-1]}"
    return text if text.startswith(run.source) else f"{run.source}: {text}"


def _json_line(run: ModelRun) -> str:
    if run.result is not None:
        from bnfuse.report import to_json

        data: dict[str, Any] = json.loads(to_json(run.result))
    else:
        data = {
            "schema": ERROR_SCHEMA,
            "source": run.source,
            "status": run.status,
            "error": run.error,
            "exit_code": run.exit_code,
        }
    return json.dumps(data, sort_keys=True, allow_nan=False)


def summary_dict(runs: Sequence[ModelRun]) -> dict[str, Any]:
    """The summary as JSON-ready data (schema ``bnfuse.summary/1``)."""
    models = []
    for run, row in zip(runs, summary_rows(runs), strict=True):
        models.append(
            {
                "source": run.source,
                "output": run.output,
                "status": run.status,
                "exit_code": run.exit_code,
                "error": run.error,
                "folded": len(run.result.folds) if run.result else None,
                "left": len(run.result.refusals) if run.result else None,
                "validation": row[3],
                "seconds": round(run.seconds, 4),
                "reports": list(run.reports),
            }
        )
    return {"schema": SUMMARY_SCHEMA, "exit_code": worst_exit_code(runs), "models": models}


def summary_markdown(runs: Sequence[ModelRun]) -> str:
    """The summary table as Markdown."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# bnfuse summary", "", "| " + " | ".join(HEADERS) + " |"]
    lines.append("|---|---:|---:|---|---:|---|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in summary_rows(runs)]
    lines += ["", f"Exit code: {worst_exit_code(runs)}", ""]
    return "\n".join(lines)


def _write_summary(runs: Sequence[ModelRun], directory: Path) -> None:
    files = [
        ("summary.md", summary_markdown(runs)),
        ("summary.json", json.dumps(summary_dict(runs), indent=2, sort_keys=True) + "\n"),
    ]
    if html_available():  # a page per model was written beside NAME.md: link them
        from bnfuse.report_html import summary_page

        entries = [(r.result, f"{Path(r.source).name}.html") for r in runs if r.result]
        files.append(("summary.html", summary_page(entries, failures=len(runs) - len(entries))))
    for name, text in files:
        with atomic_path(directory / name) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _render_summary(runs: Sequence[ModelRun], console: Any) -> None:
    from rich.text import Text

    ok = sum(1 for r in runs if r.status == "ok")
    failed = sum(1 for r in runs if r.status == "failed")
    skipped = len(runs) - ok - failed
    title = f"bnfuse: {len(runs)} model(s): {ok} ok, {failed} failed"
    title += f", {skipped} skipped" if skipped else ""
    console.print(Text(title, style="bold red" if failed else "bold"))
    lines = aligned([HEADERS, *summary_rows(runs)], right=frozenset({1, 2, 4}))
    console.print(Text(lines[0], style="bold"), soft_wrap=True)
    for run, line in zip(runs, lines[1:], strict=True):
        style = "red" if run.status == "failed" else "yellow" if run.status == "skipped" else ""
        console.print(Text(line, style=style), soft_wrap=True)


def run_many(args: argparse.Namespace, streams: Any) -> int:
    """Fuse every model ``args.models`` stands for; returns the worst exit code."""
    report_dir = _report_dir(args.report)
    options = options_from(args)
    show = not args.quiet and not args.json and _common.is_terminal(streams.err)
    err_console = None
    cb, stop = None, None
    if show:
        from rich.console import Console

        err_console = Console(file=streams.err)
        cb, stop = _common.progress_bar(err_console)

    def on_result(run: ModelRun) -> None:
        if run.exit_code:
            line = f"bnfuse: error: {_error_line(run)}"
            if err_console is not None:
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                streams.err.write(line + "\n")
                streams.err.flush()
        if args.json:
            streams.out.write(_json_line(run) + "\n")
            streams.out.flush()

    try:
        runs = fuse_many(
            args.models,
            args.output,
            options=options,
            jobs=args.jobs,
            fail_fast=args.fail_fast,
            report_dir=report_dir,
            progress=cb,
            on_result=on_result,
        )
    finally:
        if stop is not None:
            stop()
    if args.json:  # models --fail-fast skipped have a line too
        for run in runs:
            if run.status == "skipped":
                streams.out.write(_json_line(run) + "\n")
    else:
        _render_summary(runs, _common.console_for(streams.out))
    if report_dir is not None:
        _write_summary(runs, report_dir)
    return worst_exit_code(runs)
