"""Charts of the HTML report, drawn by matplotlib as inline SVG (the ``html`` extra).

Importing this module imports matplotlib; :mod:`bnfuse.report_html` imports it only while
writing an HTML report, so ``import bnfuse`` stays light. Figures are made with
``matplotlib.figure.Figure`` directly (no pyplot: no global figure registry, no GUI
backend) and written as SVG with text kept as text, ids salted per chart (several SVGs
share one HTML document, so their clip-path ids must not collide) and no date, so the
same data gives the same bytes.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from bnfuse.result import LatencyRow, OutputMetrics

__all__ = ["latency_chart", "speedup_chart", "validation_chart"]

ORIGINAL = "#8c8c8c"
FUSED = "#1f77b4"
FAIL = "#d62728"
PASS = "#2ca02c"
_FONT = ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica", "sans-serif"]


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), ready to inline."""
    buf = io.StringIO()
    with matplotlib.rc_context(
        {"svg.fonttype": "none", "svg.hashsalt": salt, "font.family": _FONT}
    ):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    svg = text[start:]
    # inline SVG in HTML needs no namespace declarations, and the RDF metadata block only
    # names matplotlib: drop both so the page holds no URL at all
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    # let the page scale it: keep the viewBox, drop the fixed size in points
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r"<svg\1", svg, count=1)
    svg = _prefix_ids(svg, salt)
    return svg.replace("<svg", f'<svg role="img" class="chart" data-chart="{salt}"', 1)


def _prefix_ids(svg: str, prefix: str) -> str:
    """Prefix every id of the SVG and every reference to one (``url(#id)``, ``href="#id"``):
    matplotlib numbers its elements per figure (``patch_1``, ``line2d_3``...), so two
    charts in one page would otherwise share ids."""
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    if not ids:
        return svg

    def ref(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)}{prefix}-{name}" if name in ids else m.group(0)

    svg = re.sub(r'(\bid=")([^"]+)', ref, svg)
    return re.sub(r"(url\(#|href=\"#)([^)\"]+)", ref, svg)


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=96)
    fig.set_facecolor("white")
    return fig


def _cut(values: Sequence[np.ndarray]) -> float:
    """Upper x limit of a timing panel: per side, the p99 or the third quartile plus
    three interquartile ranges, whichever is smaller; the larger of the two sides. A
    few runs delayed by the OS would otherwise squash the distribution into one
    column; the chart says how many runs lie beyond the axis."""
    cuts = []
    for v in values:
        if v.size:
            q1, q3, p99 = np.percentile(v, [25, 75, 99])
            cuts.append(float(min(p99, q3 + 3 * (q3 - q1))))
    return max(cuts)


def latency_chart(rows: Sequence[LatencyRow], salt: str) -> str | None:
    """One panel per row: the distribution of every timed run of the original and the
    fused model (violin for the shape, box for the quartiles, dots for medians). None
    when no row kept its raw timings."""
    rows = [r for r in rows if r.original_ms and r.fused_ms]
    if not rows:
        return None
    fig = _figure(7.5, 0.35 + 1.25 * len(rows))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, rows, strict=True):
        data = [np.asarray(row.original_ms), np.asarray(row.fused_ms)]
        hi = _cut(data)
        lo = min(float(np.min(v)) for v in data)
        span = max(hi - lo, 1e-9)
        clipped = [v[v <= hi] if np.any(v <= hi) else v for v in data]
        parts = ax.violinplot(
            clipped, positions=[1, 0], orientation="horizontal", showextrema=False, widths=0.8
        )
        for body, color in zip(parts["bodies"], (ORIGINAL, FUSED), strict=True):
            body.set_facecolor(color)
            body.set_edgecolor(color)
            body.set_alpha(0.35)
        ax.boxplot(
            clipped,
            positions=[1, 0],
            orientation="horizontal",
            widths=0.25,
            showfliers=False,
            medianprops={"color": "black", "linewidth": 1.5},
            boxprops={"linewidth": 0.9},
            whiskerprops={"linewidth": 0.9},
        )
        ax.set_yticks([1, 0], ["original", "fused"])
        ax.set_xlim(lo - 0.05 * span, hi + 0.05 * span)
        slow = sum(int(np.sum(v > hi)) for v in data)
        cut = f"; {slow} slower run(s) beyond the axis" if slow else ""
        ax.set_title(
            f"{row.runtime}, batch {row.batch}: {row.original.runs}+{row.fused.runs} runs{cut}",
            fontsize=9,
            loc="left",
        )
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("milliseconds per run (lower is better)", fontsize=9)
    fig.tight_layout()
    return _svg(fig, salt)


def speedup_chart(rows: Sequence[LatencyRow], salt: str) -> str | None:
    """Paired speedup (median of original/fused per pair) with its 95% CI, one line per
    row; a dashed line marks 1.0 (no change)."""
    if not rows:
        return None
    fig = _figure(7.5, 0.6 + 0.38 * len(rows))
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows, strict=True):
        lo, hi = row.speedup_ci
        color = PASS if lo > 1.0 else FAIL if hi < 1.0 else ORIGINAL
        ax.errorbar(
            [row.speedup],
            [y],
            xerr=[[max(0.0, row.speedup - lo)], [max(0.0, hi - row.speedup)]],
            fmt="o",
            color=color,
            capsize=3,
            markersize=5,
        )
        ax.annotate(
            f"{row.speedup:.2f}x [{lo:.2f}, {hi:.2f}]",
            (hi, y),
            xytext=(6, -3),
            textcoords="offset points",
            fontsize=8,
        )
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(ys, [f"{r.runtime}, batch {r.batch}" for r in rows], fontsize=8)
    xs = [v for r in rows for v in (*r.speedup_ci, r.speedup, 1.0) if math.isfinite(v)]
    left, right = min(xs), max(xs)
    pad = max(right - left, 0.02)
    ax.set_xlim(left - 0.1 * pad, right + 0.45 * pad)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("speedup, original time / fused time (> 1: fused is faster)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _svg(fig, salt)


def _floor(values: Sequence[float]) -> float:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return min(positive) / 10 if positive else 1e-12


def validation_chart(outputs: Sequence[OutputMetrics], salt: str) -> str | None:
    """Per output, on a log scale: the largest absolute error, the smallest atol that
    would pass and the atol used (a failed output's name is red and says FAIL). Errors
    of exactly 0 are drawn at the floor of the axis and labelled ``0``."""
    if not outputs:
        return None
    fig = _figure(7.5, 0.8 + 0.55 * len(outputs))
    ax = fig.subplots()
    every = [v for o in outputs for v in (o.max_abs_error, o.min_atol, o.atol)]
    floor = _floor(every)
    top = max([v for v in every if math.isfinite(v)] + [floor * 10])
    h = 0.27
    labels = []
    for i, o in enumerate(outputs[::-1]):
        bars = (
            (o.max_abs_error, "max abs error", FUSED, h),
            (o.min_atol, "smallest passing atol", "#9467bd", 0.0),
            (o.atol, "atol used", ORIGINAL, -h),
        )
        for value, name, color, dy in bars:
            finite = math.isfinite(value)
            shown = value if finite and value > 0 else (top * 10 if not finite else floor)
            base = floor / 2  # a log axis has no 0: bars start at its left edge
            ax.barh(
                i + dy, shown - base, height=h, left=base, color=color, label=name if i == 0 else ""
            )
            text = "0" if value == 0 else f"{value:.2g}" if finite else "inf / nan"
            ax.annotate(
                text, (shown, i + dy), xytext=(3, -3), textcoords="offset points", fontsize=7
            )
        short = o.name if len(o.name) <= 28 else o.name[:25] + "…"
        labels.append(short if o.passed else f"{short} (FAIL)")
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, top * 60)
    ax.set_yticks(range(len(outputs)), labels, fontsize=8)
    for tick, o in zip(ax.get_yticklabels(), outputs[::-1], strict=True):
        tick.set_color(PASS if o.passed else FAIL)
    ax.set_xlabel("absolute error (log scale)", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _svg(fig, salt)
