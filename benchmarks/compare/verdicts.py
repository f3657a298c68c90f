"""Verdicts of the head-to-head: each target checked on each model (met, missed or not
applicable, with the numbers), the places where a peer beat bnfuse, and the Verdict
section's lines. Timing ties are judged on paired ratios with a tolerance, a bootstrap CI
and agreement across session blocks; error ties within the original's own float32 error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from _peers import PEERS

from compare.results import LEVELS, CaseResult, OnnxResult, ToolResult

#: latency ratios within this are ties (timing noise)
LAT_TOL = 0.03


def err_tol(o: OnnxResult) -> float:
    """Errors closer than this are float32 rounding noise: the unfused original's own
    float32 error vs float64, at least 1e-7 * max(1, max|reference|)."""
    return max(o.err_original_abs, 1e-7 * max(1.0, o.ref_max_abs))


def peers_valid(o: OnnxResult) -> dict[str, ToolResult]:
    return {t: o.tools[t] for t in PEERS if t in o.tools and o.tools[t].valid}


def best_of(values: Mapping[str, float | int | None]) -> tuple[list[str], float | None]:
    """The keys holding the lowest value (ties: all of them) and that value; None ignored."""
    have = {k: v for k, v in values.items() if v is not None}
    if not have:
        return [], None
    lo = min(have.values())
    return [k for k, v in have.items() if v == lo], lo


def clearly_faster(
    ratio: float | None, ci: tuple[float, float] | None, blocks: Sequence[float] | None = None
) -> bool:
    """A paired ratio (> 1: faster) beyond the tie band, whose 95% CI excludes 1 and which
    every session block but at most one agrees with (in its own block a model's session is
    created first, which costs it up to ~10% on this VM)."""
    return (
        ratio is not None
        and ratio > 1 + LAT_TOL
        and (ci is None or ci[0] > 1.0)
        and _disagree(blocks, faster=True) <= 1
    )


def clearly_slower(
    ratio: float | None, ci: tuple[float, float] | None, blocks: Sequence[float] | None = None
) -> bool:
    return (
        ratio is not None
        and ratio < 1 - LAT_TOL
        and (ci is None or ci[1] < 1.0)
        and _disagree(blocks, faster=False) <= 1
    )


def _disagree(blocks: Sequence[float] | None, faster: bool) -> int:
    if not blocks:
        return 0
    bad = sum(1 for b in blocks if (b <= 1.0 if faster else b >= 1.0))
    return bad if len(blocks) >= 3 else bad * 2  # with 1-2 blocks, all must agree


@dataclass
class Check:
    """One target on one model."""

    target: str
    model: str
    met: bool | None  # None: not applicable
    detail: str


def onnx_checks(name: str, o: OnnxResult) -> list[Check]:
    """The targets on one ONNX model (every one missed when bnfuse's output is unusable)."""
    out: list[Check] = []
    label = f"{name}.onnx"
    b = o.tools["bnfuse"]
    peers = peers_valid(o)
    if not b.valid:
        why = b.failed or b.err_failed or f"max error {b.err_abs:.2e} (wrong)"
        for target in ("nodes", "strict", "time", "error", "latency"):
            out.append(Check(target, label, False, f"bnfuse output unusable: {why}"))
        return out
    names, best_left = best_of({t: r.left for t, r in peers.items()})
    if best_left is None:
        out.append(Check("nodes", label, None, "no peer produced a valid model"))
    else:
        out.append(
            Check(
                "nodes",
                label,
                b.left is not None and b.left <= best_left,
                f"bnfuse {b.left}, best peer {best_left} ({', '.join(names)})",
            )
        )
    if o.strict_kinds and best_left is not None:
        # a tie at 0 is the goal: strictly fewer is asked only where the best peer
        # leaves some (fewer than 0 is impossible)
        met = b.left is not None and (b.left < best_left or b.left == best_left == 0)
        out.append(
            Check(
                "strict",
                label,
                met,
                f"bnfuse folds {', '.join(o.strict_kinds)}: bnfuse {b.left}, "
                f"best peer {best_left} ({', '.join(names)})"
                + ("" if met else " - the peer folds these too"),
            )
        )
    names, fastest = best_of({t: r.fold_ms for t, r in peers.items()})
    if fastest is not None and b.fold_ms is not None:
        ratio = b.fold_ms / fastest
        out.append(
            Check(
                "time",
                label,
                ratio <= 1.0,
                f"bnfuse {b.fold_ms:.1f} ms, fastest peer {names[0]} {fastest:.1f} ms "
                f"(ratio {ratio:.2f})",
            )
        )
    # the same target among the peers that do the same work: leave no more BN/affine
    # nodes than bnfuse (a tool that folds nothing is fast at it)
    same_work = {
        t: r.fold_ms
        for t, r in peers.items()
        if r.left is not None and b.left is not None and r.left <= b.left
    }
    names, fastest = best_of(same_work)
    if b.fold_ms is not None:
        if fastest is None:
            detail = f"no peer folds as much as bnfuse (bnfuse {b.left} left)"
            out.append(Check("time-same-work", label, None, detail))
        else:
            ratio = b.fold_ms / fastest
            out.append(
                Check(
                    "time-same-work",
                    label,
                    ratio <= 1.0,
                    f"bnfuse {b.fold_ms:.1f} ms, fastest peer leaving no more "
                    f"({b.left}) {names[0]} {fastest:.1f} ms (ratio {ratio:.2f})",
                )
            )
    names, best_err = best_of({t: r.err_abs for t, r in peers.items()})
    if best_err is not None and b.err_abs is not None:
        tol = err_tol(o)
        out.append(
            Check(
                "error",
                label,
                b.err_abs <= best_err + tol,
                f"bnfuse {b.err_abs:.2e}, best peer {names[0]} {best_err:.2e} "
                f"(tolerance {tol:.1e})",
            )
        )
    lat = b.latency.get("ORT_ENABLE_ALL")
    if lat is not None and "ORT_ENABLE_ALL" in o.latency_original:
        orig = o.latency_original["ORT_ENABLE_ALL"].median_ms
        out.append(
            Check(
                "latency",
                label,
                not clearly_slower(lat.vs_original, lat.vs_original_ci, lat.blocks_vs_original),
                f"original {orig:.3f} ms, bnfuse {lat.median_ms:.3f} ms "
                f"(paired {lat.vs_original:.2f}x{_ci(lat.vs_original_ci)})",
            )
        )
    return out


def checks(results: list[CaseResult]) -> list[Check]:
    out: list[Check] = []
    for c in results:
        o = c.onnx
        if o is not None:
            out += onnx_checks(c.name, o)
            if not o.tools["bnfuse"].valid:
                continue  # every target already missed on this case
        k = c.keras
        if k is not None and k.tf_speedup is not None:
            out.append(
                Check(
                    "keras latency",
                    f"{c.name}.keras",
                    not clearly_slower(k.tf_speedup, k.tf_speedup_ci),
                    f"tf.function original {k.tf_original_ms:.3f} ms, fused "
                    f"{k.tf_fused_ms:.3f} ms ({k.tf_speedup:.2f}x{_ci(k.tf_speedup_ci)})",
                )
            )
    return out


def peer_wins(results: list[CaseResult]) -> list[str]:
    """Every (model, metric) where a peer beat bnfuse beyond the tolerance."""
    lines = []
    for c in results:
        o = c.onnx
        if o is None:
            continue
        b = o.tools["bnfuse"]
        label = f"{c.name}.onnx"
        for t, r in peers_valid(o).items():
            if r.left is not None and b.left is not None and r.left < b.left:
                lines.append(f"{label}: {t} leaves fewer BN/affine nodes ({r.left} vs {b.left})")
            if r.fold_ms is not None and b.fold_ms is not None and r.fold_ms < b.fold_ms:
                lines.append(
                    f"{label}: {t} folds faster ({r.fold_ms:.1f} vs {b.fold_ms:.1f} ms, "
                    f"bnfuse {b.fold_ms / r.fold_ms:.2f}x slower)"
                )
            if (
                r.err_abs is not None
                and b.err_abs is not None
                and r.err_abs + err_tol(o) < b.err_abs
            ):
                lines.append(f"{label}: {t} is more accurate ({r.err_abs:.2e} vs {b.err_abs:.2e})")
            for level in LEVELS:
                lr, lb = r.latency.get(level), b.latency.get(level)
                if lr and lb and clearly_faster(lr.vs_bnfuse, lr.vs_bnfuse_ci, lr.blocks_vs_bnfuse):
                    lines.append(
                        f"{label}: {t}'s output runs faster at {level} "
                        f"({lr.median_ms:.3f} vs {lb.median_ms:.3f} ms, paired "
                        f"{lr.vs_bnfuse:.2f}x{_ci(lr.vs_bnfuse_ci)})"
                    )
    return lines


TARGETS = {
    "nodes": "BN/affine nodes left: bnfuse <= best peer",
    "strict": (
        "strictly fewer where bnfuse folds Gemm/MatMul/ConvTranspose or forward and the best "
        "peer leaves some (a tie at 0 is the goal)"
    ),
    "time": "fold wall time: bnfuse <= fastest peer, including peers that fold less",
    "time-same-work": (
        "fold wall time: bnfuse <= fastest peer among those leaving no more BN/affine nodes "
        "(where any does)"
    ),
    "error": "max abs error vs float64: bnfuse <= best peer + tolerance",
    "latency": "ORT_ENABLE_ALL latency: bnfuse output no slower than the original",
    "keras latency": "tf.function latency: fused Keras model no slower than the original",
}


#: checks shown as information only: "time" compares against peers that fold less (the
#: like-for-like target is "time-same-work")
INFO_ONLY = frozenset({"time"})


def verdict_lines(results: list[CaseResult]) -> list[str]:
    cs = checks(results)
    lines = []
    for key, text in TARGETS.items():
        mine = [c for c in cs if c.target == key and c.met is not None]
        if not mine:
            continue
        missed = [c for c in mine if not c.met]
        if key in INFO_ONLY:  # information, not a target: a peer that folds less is no rival
            lines.append(
                f"- info (not a target; see the like-for-like verdict): {text}: met on "
                f"{len(mine) - len(missed)} of {len(mine)} models"
                + ("" if not missed else " - slower: " + "; ".join(c.model for c in missed))
            )
        elif missed:
            lines.append(
                f"- **MISSED** {text}: {len(missed)} of {len(mine)} models - "
                + "; ".join(f"{c.model}: {c.detail}" for c in missed)
            )
        else:
            lines.append(f"- met: {text} ({len(mine)} of {len(mine)} models)")
    wins = peer_wins(results)
    lines.append("")
    if wins:
        lines.append(f"Peer wins ({len(wins)}):")
        lines.append("")
        lines += [f"- {w}" for w in wins]
    else:
        lines.append("Peer wins: none.")
    bad = [
        f"{c.name}.onnx: {t} "
        + (f"failed: {r.failed}" if r.failed else f"output wrong ({err_text(r)})")
        for c in results
        if c.onnx is not None
        for t, r in c.onnx.tools.items()
        if t != "bnfuse" and not r.valid
    ]
    if bad:
        lines += ["", "Peers out of the comparison on a model (failed, or output wrong):", ""]
        lines += [f"- {x}" for x in bad]
    return lines


def err_text(r: ToolResult) -> str:
    if r.err_failed:
        return f"does not run: {r.err_failed}"
    return f"max abs error {r.err_abs:.2e}, {r.err_rel:.1e} relative"


def _ci(ci: tuple[float, float] | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else ""
