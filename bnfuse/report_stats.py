"""The report's BN-statistics sections: ``--check-stats`` entries, fold widening, and
``--recalibrate``'s output shift. :mod:`bnfuse.report` passes in its own section and cell
types (this module imports no report code, so there is no cycle) and renders the result
to the terminal and to Markdown like every other section."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from bnfuse.result import FuseResult
from bnfuse.stats import WIDENING_LIMIT

__all__ = ["stats_sections"]

S = TypeVar("S")

#: rows shown per table without ``--verbose`` (worst first)
SHORT = 10

_FLAG_STYLE = {
    "ok": "green",
    "drift": "bold red",
    "default": "bold red",
    "invalid": "bold red",
    "tiny-variance": "yellow",
    "no-stats": "dim",
    "not-checked": "dim",
}


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return "inf" if x > 0 else "nan"
    return f"{x:.3g}{unit}"


def stats_sections(
    result: FuseResult, verbose: bool, section: Callable[..., S], cell: Callable[..., Any]
) -> list[S]:
    """Sections for ``result.bn_stats``, the folds' widening and ``result.recalibration``
    (none when those are absent). ``section(title, headers, rows, lines, right)`` and
    ``cell(text, style, code)`` are the report's own constructors."""
    out: list[S] = []
    stats = result.bn_stats
    if stats:
        flagged = sum(s.flag not in ("ok", "no-stats", "not-checked") for s in stats)
        rows: list[tuple[Any, ...]] = []
        for s in stats if verbose else stats[:SHORT]:
            rows.append(
                (
                    cell(s.bn, "cyan", True),
                    cell(s.flag, _FLAG_STYLE.get(s.flag, "")),
                    cell(_num(s.mean_shift)),
                    cell(_num(s.var_ratio, "x")),
                    cell(_num(s.max_scale)),
                    cell(str(s.samples) if s.samples else "—"),
                    cell(s.note),
                )
            )
        lines = []
        if len(stats) > len(rows):
            lines.append((f"… {len(stats) - len(rows)} more (all in --verbose and JSON)", "dim"))
        title = f"BN statistics: {len(stats)} normalization(s), {flagged} flagged"
        headers: tuple[str, ...] = (
            "BN",
            "flag",
            "mean shift",
            "var ratio",
            "max scale",
            "values/ch",
            "note",
        )
        out.append(section(title, headers, rows, lines, frozenset({2, 3, 4, 5})))
    wide = [f for f in result.folds if f.widening is not None or f.scale_spread is not None]
    if wide:

        def worst(f: Any) -> float:
            return max(x for x in (f.widening, f.scale_spread, 0.0) if x is not None)

        wide.sort(key=worst, reverse=True)
        over = sum(worst(f) > WIDENING_LIMIT for f in wide)
        rows = []  # (the same list type as above)
        for f in wide if verbose else wide[:SHORT]:
            style = "bold red" if worst(f) > WIDENING_LIMIT else ""
            rows.append(
                (
                    cell(f.bn, "cyan", True),
                    cell(f.into, "cyan", True),
                    cell(_num(f.widening, "x"), style),
                    cell(_num(f.scale_spread, "x"), style),
                )
            )
        lines = [
            (
                f"{over} fold(s) widen the weight range more than {WIDENING_LIMIT:g}x: "
                "per-tensor int8 quantization loses precision on them",
                "yellow",
            )
            if over
            else (f"no fold widens the weight range more than {WIDENING_LIMIT:g}x", "dim")
        ]
        if len(wide) > len(rows):
            lines.append((f"… {len(wide) - len(rows)} more (all in --verbose and JSON)", "dim"))
        headers = ("BN", "into", "widening (max W' / max W)", "scale spread (max s / min s)")
        out.append(section("Weight range after folding", headers, rows, lines, frozenset({2, 3})))
    rec = result.recalibration
    if rec is not None:
        title = (
            f"Recalibration: {len(rec.bns)} BN(s) re-estimated from the data "
            f"({rec.waves} wave(s), {rec.runs} run(s) each); outputs against the original"
        )
        rows = [
            (
                cell(o.name, "cyan", True),
                cell(_num(o.max_abs)),
                cell(_num(o.max_rel)),
                cell("—" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%"),
            )
            for o in rec.outputs
        ]
        lines = [("validation compares the fused model with the recalibrated one", "dim")]
        headers = ("output", "max abs change", "max rel change", "top-1 agreement")
        out.append(section(title, headers, rows, lines, frozenset({1, 2, 3})))
    return out
