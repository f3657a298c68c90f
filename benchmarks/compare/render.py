"""Rendering of the head-to-head: the terminal and Markdown tables, the Machine and Method
sections, per-model details, the JSON document (schema ``bnfuse.benchmarks.run/1``) and
the compact section of RESULTS.md between the run.py markers."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import bnfuse_version, finite, load_average, utc_now
from _peers import CALLS, TOOLS

from compare.measure import ERROR_BATCH
from compare.results import WRONG_REL, CaseResult, OnnxResult, ToolResult
from compare.verdicts import (
    LAT_TOL,
    best_of,
    checks,
    clearly_faster,
    err_text,
    err_tol,
    peer_wins,
    peers_valid,
    verdict_lines,
)

BEGIN, END = "<!-- run.py:begin -->", "<!-- run.py:end -->"


def _short(text: str, n: int = 60) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def _winner(best: list[str], bnfuse_close: bool = False, close: str = "") -> str:
    if not best:
        return "-"
    if "bnfuse" in best:
        return "bnfuse" if len(best) == 1 else "tie: " + ", ".join(best)
    text = "**" + ", ".join(best) + "**"
    return text + (f" (bnfuse {close})" if bnfuse_close else "")


def _cell(r: ToolResult, body: str) -> str:
    if r.failed:
        return f"failed: {_short(r.failed)}"
    return body + (" ✗ wrong" if r.wrong else "")


def _onnx_rows(results: list[CaseResult]) -> list[tuple[str, OnnxResult]]:
    return [(f"{c.name}.onnx", c.onnx) for c in results if c.onnx is not None]


def _head(first: Sequence[str], last: Sequence[str]) -> list[str]:
    cols = [*first, *TOOLS, *last]
    return ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 2) + "|---|"]


def table_nodes(results: list[CaseResult]) -> list[str]:
    lines = _head(["model", "original"], ["winner"])
    for label, o in _onnx_rows(results):
        cells = []
        for t, r in o.tools.items():
            body = f"{r.bn}+{r.affine} ({r.nodes})"
            cells.append(f"**{body}**" if t == "bnfuse" and r.ok else _cell(r, body))
        valid = {t: r.left for t, r in o.tools.items() if r.valid}
        best, _ = best_of(valid)
        lines.append(
            f"| {label} | {o.bn}+{o.affine} ({o.nodes}) | "
            + " | ".join(cells)
            + f" | {_winner(best)} |"
        )
    return lines


def table_time(results: list[CaseResult]) -> list[str]:
    lines = _head(["model", "MB"], ["bnfuse / fastest peer", "winner"])
    for label, o in _onnx_rows(results):
        cells = [
            _cell(r, f"{r.fold_ms:.1f}" if r.fold_ms is not None else "-") for r in o.tools.values()
        ]
        b = o.tools["bnfuse"]
        _, fastest = best_of({t: r.fold_ms for t, r in peers_valid(o).items()})
        ratio = f"**{b.fold_ms / fastest:.2f}**" if fastest and b.fold_ms else "-"
        valid = {t: r.fold_ms for t, r in o.tools.items() if r.valid}
        best, _ = best_of(valid)
        lines.append(
            f"| {label} | {o.size_mb:.1f} | "
            + " | ".join(cells)
            + f" | {ratio} | {_winner(best)} |"
        )
    return lines


def table_error(results: list[CaseResult]) -> list[str]:
    lines = _head(["model", "original (fp32)"], ["tolerance", "winner", "float64 by"])
    for label, o in _onnx_rows(results):
        cells = []
        for r in o.tools.values():
            body = f"{r.err_abs:.2e}" if r.err_abs is not None else "does not run"
            cells.append(_cell(r, body))
        tol = err_tol(o)
        valid = {t: r.err_abs for t, r in o.tools.items() if r.valid}
        best, lo = best_of(valid)
        b = o.tools["bnfuse"]
        close = lo is not None and b.err_abs is not None and b.err_abs <= lo + tol
        engine = "ORT" if o.reference.startswith("onnxruntime") else "ReferenceEvaluator"
        lines.append(
            f"| {label} | {o.err_original_abs:.2e} | "
            + " | ".join(cells)
            + f" | {tol:.1e} | {_winner(best, close, 'within tolerance')} | {engine} |"
        )
    return lines


def table_latency(results: list[CaseResult], level: str) -> list[str]:
    lines = _head(["model", "original"], ["winner"])
    for label, o in _onnx_rows(results):
        orig = o.latency_original.get(level)
        cells = []
        for r in o.tools.values():
            lat = r.latency.get(level)
            if lat is None:
                why = r.latency_failed.get(level, "")
                cells.append(_cell(r, f"failed: {_short(why)}" if why else "-"))
            else:
                cells.append(_cell(r, f"{lat.median_ms:.3f} ({lat.vs_original:.2f}x)"))
        # fastest = highest paired speedup over the original (same rounds for every tool)
        speed = {
            t: -r.latency[level].vs_original
            for t, r in o.tools.items()
            if r.valid and level in r.latency
        }
        best, _ = best_of(speed)
        top = o.tools[best[0]].latency[level] if best else None
        close = top is not None and not clearly_faster(
            top.vs_bnfuse, top.vs_bnfuse_ci, top.blocks_vs_bnfuse
        )
        lines.append(f"| {label} | {orig.median_ms:.3f} | " if orig else f"| {label} | - | ")
        lines[-1] += " | ".join(cells) + f" | {_winner(best, close, 'within noise')} |"
    return lines


def table_keras(results: list[CaseResult]) -> list[str]:
    lines = [
        "| model | BN layers before → after | bnfuse fold ms (.keras → .keras) "
        "| max abs error original / fused | tf.function ms original → fused "
        "| speedup [95% CI] | runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results:
        k = c.keras
        if k is None:
            continue
        if k.err_original_abs is not None and k.err_fused_abs is not None:
            err = f"{k.err_original_abs:.2e} / {k.err_fused_abs:.2e}"
        else:
            err = _short(k.err_note) or "-"
        if k.tf_speedup is not None and k.tf_speedup_ci is not None:
            lat = f"{k.tf_original_ms:.3f} → {k.tf_fused_ms:.3f}"
            sp = f"{k.tf_speedup:.2f}x [{k.tf_speedup_ci[0]:.2f}, {k.tf_speedup_ci[1]:.2f}]"
        else:
            lat, sp = f"failed: {_short(k.tf_failed)}", "-"
        lines.append(
            f"| {c.name}.keras | {k.bns_before} → {k.bns_after} | {k.fold_ms:.0f} | {err} "
            f"| {lat} | {sp} | {k.tf_runs} |"
        )
    return lines


def table_compact(results: list[CaseResult]) -> list[str]:
    lines = [
        "| model | BN+affine left: bnfuse / best peer | fold ms: bnfuse / fastest peer "
        "| max abs error: bnfuse / best peer | ORT_ENABLE_ALL ms: original → bnfuse "
        "| peer wins |",
        "|---|---|---|---|---|---|",
    ]
    wins = peer_wins(results)
    for label, o in _onnx_rows(results):
        b = o.tools["bnfuse"]
        peers = peers_valid(o)
        nl, left = best_of({t: r.left for t, r in peers.items()})
        nt, fast = best_of({t: r.fold_ms for t, r in peers.items()})
        ne, err = best_of({t: r.err_abs for t, r in peers.items()})
        lat_o = o.latency_original.get("ORT_ENABLE_ALL")
        lat_b = b.latency.get("ORT_ENABLE_ALL")
        mine = [w.split(": ", 1)[1].split(" (")[0] for w in wins if w.startswith(label + ":")]
        lines.append(
            f"| {label} | {b.left} / {left} ({', '.join(nl) or '-'}) "
            f"| {_num(b.fold_ms, '.1f')} / {_num(fast, '.1f')} ({nt[0] if nt else '-'}) "
            f"| {_num(b.err_abs, '.1e')} / {_num(err, '.1e')} ({ne[0] if ne else '-'}) "
            f"| {_num(lat_o.median_ms if lat_o else None, '.3f')} → "
            f"{_num(lat_b.median_ms if lat_b else None, '.3f')} "
            f"| {'; '.join(mine) or '-'} |"
        )
    return lines


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ---------------------------------------------------------------------------------------
# Machine, Markdown, JSON
# ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from bnfuse.bench import machine_info

    info: dict[str, Any] = {"date": utc_now(), **machine_info()}
    for dist in ("onnx", "onnxoptimizer", "onnxslim", "onnxscript", "keras", "tf2onnx"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    load = load_average()
    if load is not None:
        info["load average (1/5/15 min) at start"] = load
    info["bnfuse"] = bnfuse_version()
    return info


def method_lines(args: argparse.Namespace) -> list[str]:
    return [
        "Tools, each run file → file (read the model, transform it, write the result):",
        "",
        *[f"- {t}: {CALLS[t]}" for t in TOOLS],
        "",
        f"- **Fold wall time**: one untimed warm-up per tool and model (its output is the one "
        f"measured below), then {args.reps} timed runs per tool, interleaved across tools "
        "(the order rotated every round, `gc.collect()` before each run; each run writes a new "
        "file, the previous output deleted untimed); the median. "
        "Every tool is warmed up once on a tiny model first (imports, library init).",
        "- **BN+affine left**: BatchNormalization nodes + BN-equivalent Mul/Add/Sub/Div by a "
        "per-channel (or scalar) constant next to a Conv/ConvTranspose/Gemm/MatMul (a "
        "MatMul's bias Add excluded), counted in the written file by "
        "`affine_vs_ort.bn_equivalents` (onnxruntime's FusedConv/FusedGemm count as the "
        "layers they are); total node count in parentheses.",
        "- **Max abs error**: max |output - reference| over all outputs, the output computed "
        "in float32 by onnxruntime CPU at ORT_DISABLE_ALL, the reference a **float64 "
        "evaluation of the original** (`benchmarks/_float64.py`: every float32 initializer, "
        "graph input/output/value_info, Cast target and Constant made float64; onnxruntime "
        "when it has float64 kernels for every op, else `onnx.reference.ReferenceEvaluator`"
        " - column 'float64 by'). Inputs: the sample models' real test images (8), "
        f"otherwise random normal, batch {ERROR_BATCH}, seed 1. The tolerance is the unfused "
        "original's own float32 error (at least 1e-7·max(1, max|reference|)): differences "
        "below it are rounding noise.",
        f"- A tool whose output errs by more than {WRONG_REL:g}·max(1, max|reference|) (or "
        "10× the original's own float32 error, if larger), or "
        "does not run, is marked ✗ wrong and, like a tool that raised ('failed: ...'), is "
        "left out of every 'best peer' comparison on that model.",
        f"- **Latency**: onnxruntime CPU, 1 intra-op thread, batch 1, random input; the "
        f"original and every tool's output timed round-robin (order rotated each round) "
        f"for {args.seconds:g} s per optimization level, split into one block per variant "
        "with fresh sessions, variant b's session created first in block b (two sessions "
        "of the same file differ steadily by up to ~10%; here the first-created one is "
        "slow), after warm-up; median ms and, in "
        "parentheses, the median of paired original/variant ratios pooled over the blocks "
        "(> 1: faster than the original). Comparisons (targets, winner, peer wins) use the "
        "paired ratios, which cancel load drift on a shared machine: one output is "
        f"*clearly* faster than another when the paired ratio is beyond 1 ± {LAT_TOL:.0%}, "
        "its bootstrap 95% CI excludes 1 and all blocks but at most one agree; anything "
        "else is a tie ('within noise'). The Keras speedup uses the same rule without "
        "blocks.",
        "- **Keras**: `bnfuse.fuse(src.keras, dst.keras, validate=False)` timed "
        f"{args.keras_reps} times after one warm-up (median); error of the original and "
        "fused Keras models (`model(x, training=False)`, float32) vs the float64 evaluation "
        "of the model's ONNX export on the same inputs; latency of `model(x, "
        "training=False)` under `tf.function` (TensorFlow 1 intra/1 inter-op thread, batch "
        "1), original vs fused loaded from their files, timed A B / B A pairs by "
        f"`bnfuse.bench.run` for {args.seconds:g} s; speedup = median of paired ratios with "
        "a bootstrap 95% CI.",
        "- keras.applications are built in code with `weights=None`, `classes=10`, "
        "`classifier_activation=None` (logits), BN statistics randomized "
        "(`affine_vs_ort.randomize_bn`), at 96×96 (above every architecture's minimum: "
        "Xception 71, InceptionV3 75); nothing is downloaded.",
    ]


def details(results: list[CaseResult]) -> list[str]:
    out: list[str] = []
    for c in results:
        out += [f"### {c.name} ({c.group})", "", c.doc.rstrip(".") + ".", ""]
        out += [f"- {n}" for n in c.notes]
        out.append(f"- benchmarked in {c.seconds:.0f} s")
        o = c.onnx
        if o is not None:
            shapes = ", ".join(f"{k} {v}" for k, v in o.error_inputs.items())
            out += [
                f"- ONNX `{o.file}`: {o.size_mb:.2f} MB, {o.nodes} nodes, {o.bn} BatchNormalization"
                f" + {o.affine} BN-equivalent Mul/Add",
                f"- error inputs: {shapes}; float64 by {o.reference}"
                + (f" ({o.reference_note})" if o.reference_note else "")
                + f"; max |reference| {o.ref_max_abs:.3g}",
                "- bnfuse folds: " + (", ".join(f"{k} ×{v}" for k, v in o.folds.items()) or "none"),
            ]
            out += [f"- bnfuse left in place: {r}" for r in o.refusals]
            for t, r in o.tools.items():
                if r.failed:
                    out.append(f"- {t} failed: {r.failed}")
                elif r.wrong:
                    out.append(f"- {t}: output wrong - {err_text(r)}")
                for level, why in r.latency_failed.items():
                    out.append(f"- {t}: latency at {level} failed: {why}")
            spread = []
            for t, r in o.tools.items():
                if r.fold_s:
                    xs = [1000 * x for x in r.fold_s]
                    spread.append(
                        f"{t} {min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}"
                    )
            if spread:
                out.append("- fold ms min / median / max: " + "; ".join(spread))
        k = c.keras
        if k is not None:
            out += [
                f"- Keras `{k.file}`: {k.size_mb:.2f} MB, {k.bns_before} → {k.bns_after} BN "
                "layers; bnfuse folds: "
                + (", ".join(f"{key} ×{v}" for key, v in k.folds.items()) or "none"),
            ]
            out += [f"- bnfuse left in place (Keras): {r}" for r in k.refusals]
            if k.err_note.startswith("failed"):
                out.append(f"- Keras error evaluation {k.err_note}")
            if k.tf_failed:
                out.append(f"- tf.function timing failed: {k.tf_failed}")
        out.append("")
    return out


def render_markdown(
    results: list[CaseResult],
    info: dict[str, Any],
    args: argparse.Namespace,
    errors: list[str],
    notes: list[str],
) -> str:
    lines = [
        "# Head-to-head: bnfuse vs onnxruntime, onnxoptimizer, onnxslim, onnxscript",
        "",
        "Generated by `benchmarks/run.py` (`make bench`; see `benchmarks/README.md`). Do not "
        "edit by hand; rerun the script. Machine-readable: `RESULTS.json`.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Verdict",
        "",
        *verdict_lines(results),
        "",
        "## BN + BN-equivalent nodes left (ONNX)",
        "",
        "`BN+affine (all nodes)` in each tool's written file; bold = bnfuse; winner = fewest "
        "left among tools whose output is right (bold names: a peer wins).",
        "",
        *table_nodes(results),
        "",
        f"## Fold wall time, file → file (median of {args.reps}, ms)",
        "",
        "'bnfuse / fastest peer' < 1 means bnfuse is faster.",
        "",
        *table_time(results),
        "",
        "## Max abs error vs a float64 evaluation of the original",
        "",
        *table_error(results),
        "",
        "## onnxruntime latency, ORT_ENABLE_ALL (median ms, ×: vs the original)",
        "",
        *table_latency(results, "ORT_ENABLE_ALL"),
        "",
        "## onnxruntime latency, ORT_DISABLE_ALL (median ms, ×: vs the original)",
        "",
        *table_latency(results, "ORT_DISABLE_ALL"),
        "",
    ]
    if any(c.keras is not None for c in results):
        lines += [
            "## Keras models: bnfuse on .keras, tf.function latency",
            "",
            "No peer folds a Keras model; this is bnfuse against the unfused original.",
            "",
            *table_keras(results),
            "",
        ]
    lines += ["## Method", "", *method_lines(args), "", "## Per-model details", ""]
    lines += details(results)
    if errors:
        lines += ["## Errors (models that crashed)", "", *[f"- {e}" for e in errors], ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def to_json(
    results: list[CaseResult], info: dict[str, Any], args: argparse.Namespace, errors: list[str]
) -> dict[str, Any]:
    cases = []
    for c in results:
        d = dataclasses.asdict(c)
        if c.onnx is not None:
            for t, r in c.onnx.tools.items():
                d["onnx"]["tools"][t].update(
                    fold_ms=r.fold_ms, left=r.left, valid=r.valid, wrong=r.wrong
                )
            d["onnx"]["error_tolerance"] = err_tol(c.onnx)
        if c.keras is not None:
            d["keras"]["fold_ms"] = c.keras.fold_ms
        cases.append(d)
    return finite(
        {
            "schema": "bnfuse.benchmarks.run/1",
            "machine": info,
            "settings": {
                "reps": args.reps,
                "keras_reps": args.keras_reps,
                "seconds": args.seconds,
                "quick": args.quick,
                "models": [c.name for c in results],
                "tools": list(TOOLS),
                "calls": CALLS,
                "wrong_rel": WRONG_REL,
                "latency_tolerance": LAT_TOL,
                "notes": args.note,
            },
            "verdict": {
                "checks": [dataclasses.asdict(c) for c in checks(results)],
                "peer_wins": peer_wins(results),
            },
            "cases": cases,
            "errors": errors,
        }
    )


def summary_section(results: list[CaseResult], info: dict[str, Any]) -> list[str]:
    lines = [
        BEGIN,
        "## Head-to-head (`benchmarks/run.py`, `make bench`)",
        "",
        f"bnfuse vs onnxruntime (offline, ORT_ENABLE_BASIC), onnxoptimizer, onnxslim and "
        f"onnxscript, all in one run on {info.get('date', '?')} ({info.get('cpu', '?')}, "
        f"{info.get('usable_cores', '?')} usable cores). Full tables, method and per-model "
        "details: [RESULTS-compare.md](RESULTS-compare.md); all numbers: "
        "[RESULTS.json](RESULTS.json). 'best/fastest peer' is over the peers whose output "
        "is right; errors are vs a float64 evaluation of the original.",
        "",
        *table_compact(results),
        "",
    ]
    if any(c.keras is not None for c in results):
        lines += [
            "| Keras model | BN layers before → after | bnfuse fold ms | tf.function ms "
            "original → fused (speedup) |",
            "|---|---|---|---|",
        ]
        for c in results:
            k = c.keras
            if k is None:
                continue
            lat = (
                f"{k.tf_original_ms:.3f} → {k.tf_fused_ms:.3f} ({k.tf_speedup:.2f}x)"
                if k.tf_speedup is not None
                else f"failed: {_short(k.tf_failed)}"
            )
            lines.append(
                f"| {c.name}.keras | {k.bns_before} → {k.bns_after} | {k.fold_ms:.0f} | {lat} |"
            )
        lines.append("")
    verdict = [x for x in verdict_lines(results) if x.startswith("- ")]
    lines += [
        "Targets:",
        "",
        *[x for x in verdict if x.startswith(("- **MISSED**", "- met:", "- info"))],
    ]
    lines += ["", END]
    return lines


def update_summary(path: Path, section: list[str]) -> None:
    """Replace the text between the run.py markers of ``path`` (insert the markers after
    the first paragraph when absent); the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(section)
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(head + block + tail)
        return
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1  # title and blank lines
    while i < len(lines) and lines[i].strip():
        i += 1  # the first paragraph
    new = "".join(lines[:i]) + ("\n" if i else "") + block + "\n" + "".join(lines[i:])
    path.write_text(new)
