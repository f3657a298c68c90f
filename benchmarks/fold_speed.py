"""Time bnfuse's load+fold+save against onnxruntime's own offline optimizer.

For every model in ``benchmarks/models.py`` (built in code, no downloads), in one run:

* bnfuse:      ``bnfuse.fuse(path, out, validate=False)``   (load, fold, save)
* onnxruntime: ``InferenceSession(path, so)`` with ``ORT_ENABLE_BASIC`` and
  ``so.optimized_model_filepath = out``                      (load, optimize, save)
* a yardstick, "no-fold": bnfuse with every rule skipped (load, checks, BNs found and
  refused, save of an unchanged copy): the fixed cost a fold pass starts from

Repetitions are interleaved (bnfuse, ORT, no-fold, no-fold, ORT, bnfuse, ...) after one
untimed warm-up of each; each writes a new file (the previous output is deleted
untimed); medians are compared. Then both written models are loaded with ``onnx`` to
count the BatchNormalization nodes left, and both are run against the original
(onnxruntime, optimizations disabled) on random inputs to report the largest output
difference.

Targets (issue 2): bnfuse no slower than onnxruntime on every model (ratio <= 1), and it
folds every BN that onnxruntime folds. Missing a target is reported, not an error: the
exit status is non-zero only when something crashed.

    .venv/bin/python benchmarks/fold_speed.py [--quick] [--reps N] [--models a,b]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # fallback when bnfuse is not installed

import models as bench_models  # noqa: E402
from _common import bnfuse_fold as run_bnfuse  # noqa: E402
from _common import (  # noqa: E402
    machine_info,
    one_line,
    ort_outputs,
    random_feeds,
    timed,
)
from _common import ort_offline as run_ort  # noqa: E402

DEFAULT_RESULTS = HERE / "RESULTS-fold-speed.md"


# ---------------------------------------------------------------------------------------
# The two contenders
# ---------------------------------------------------------------------------------------


def run_floor(src: Path, dst: Path) -> Any:
    """bnfuse with every rule skipped: load, checks, BNs found and refused, counts and an
    atomic write of the unchanged model - the fixed cost a fold pass starts from (not a
    target, a yardstick)."""
    import bnfuse
    from bnfuse.onnx.backend import OnnxBackend

    return bnfuse.fuse(src, dst, validate=False, skip=OnnxBackend().rule_names())


# ---------------------------------------------------------------------------------------
# Checks on the written models
# ---------------------------------------------------------------------------------------


def bn_names(model: onnx.ModelProto) -> list[str]:
    """Names (or output names) of the BatchNormalization nodes of the main graph."""
    return [n.name or n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]


def max_rel_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """max |got - ref| / max(1, max |ref|) over all outputs."""
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(a64))))
        worst = max(worst, float(np.max(np.abs(b64 - a64))) / scale)
    return worst


# ---------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    doc: str
    nodes: int
    bns: int
    params: int
    size_mb: float
    bnfuse_s: list[float] = field(default_factory=list)
    ort_s: list[float] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)
    bnfuse_left: list[str] = field(default_factory=list)
    ort_left: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    err_bnfuse: float = float("nan")
    err_ort: float = float("nan")
    phases: dict[str, float] = field(default_factory=dict)
    profile: str = ""

    @property
    def bnfuse_ms(self) -> float:
        return 1000 * statistics.median(self.bnfuse_s)

    @property
    def ort_ms(self) -> float:
        return 1000 * statistics.median(self.ort_s)

    @property
    def floor_ms(self) -> float:
        return 1000 * statistics.median(self.floor_s)

    @property
    def ratio(self) -> float:
        return self.bnfuse_ms / self.ort_ms

    @property
    def missed(self) -> list[str]:
        """BNs onnxruntime folded that bnfuse left in place."""
        return sorted(set(self.bnfuse_left) - set(self.ort_left))

    @property
    def speed_ok(self) -> bool:
        return self.ratio <= 1.0

    @property
    def folds_ok(self) -> bool:
        return not self.missed


def bench_model(name: str, reps: int, work: Path, profile: bool) -> Row:
    model = bench_models.build(name)
    src = work / f"{name}.onnx"
    onnx.save(model, str(src))
    info = bench_models.describe(model)
    doc = " ".join((bench_models.MODELS[name].__doc__ or "").split())
    row = Row(name, doc, info["nodes"], info["bn"], info["params"], src.stat().st_size / 1e6)
    del model
    out_b, out_o = work / f"{name}.bnfuse.onnx", work / f"{name}.ort.onnx"
    out_n = work / f"{name}.floor.onnx"

    def one_bnfuse() -> Any:
        return run_bnfuse(src, out_b)

    def one_ort() -> Any:
        return run_ort(src, out_o)

    def one_floor() -> Any:
        return run_floor(src, out_n)

    one_bnfuse(), one_ort(), one_floor()  # warm-up: page cache, lazy imports, allocator
    result = None
    for i in range(reps):
        order = (("b", one_bnfuse, out_b), ("o", one_ort, out_o), ("n", one_floor, out_n))
        for who, fn, dst in order if i % 2 == 0 else order[::-1]:
            # both write a new file: replacing an existing one makes the kernel free the
            # old file's pages inside the timed call (tens of ms at 100 MB), for either tool
            dst.unlink(missing_ok=True)
            dt, out = timed(fn)
            if who == "b":
                row.bnfuse_s.append(dt)
                result = out
            elif who == "o":
                row.ort_s.append(dt)
            else:
                row.floor_s.append(dt)

    row.bnfuse_left = bn_names(onnx.load(str(out_b)))
    row.ort_left = bn_names(onnx.load(str(out_o)))
    if result is not None:
        row.refusals = [f"{r.bn}: {r.reason}" for r in result.refusals]

    feeds = random_feeds(onnx.load(str(src), load_external_data=False))
    ref = ort_outputs(src, feeds)
    row.err_bnfuse = max_rel_diff(ref, ort_outputs(out_b, feeds))
    row.err_ort = max_rel_diff(ref, ort_outputs(out_o, feeds))

    row.phases = phase_breakdown(src, work / f"{name}.phases.onnx")
    if profile:
        row.profile = profile_bnfuse(src, work / f"{name}.profile.onnx")
    return row


def warm_up(work: Path) -> None:
    """Pay first-call costs (imports, onnxruntime's library init) once, outside any timing."""
    src = work / "warmup.onnx"
    onnx.save(bench_models.build("small_mixed"), str(src))
    run_bnfuse(src, work / "warmup.bnfuse.onnx")
    run_ort(src, work / "warmup.ort.onnx")
    run_floor(src, work / "warmup.floor.onnx")
    phase_breakdown(src, work / "warmup.phases.onnx")


def phase_breakdown(src: Path, dst: Path) -> dict[str, float]:
    """One extra bnfuse run split into its ONNX backend's load / fuse / save (seconds)."""
    from bnfuse.backend import FuseOptions
    from bnfuse.onnx.backend import OnnxBackend

    be = OnnxBackend()
    gc.collect()
    t0 = time.perf_counter()
    model = be.load(src)
    t1 = time.perf_counter()
    res = be.fuse(model, FuseOptions())
    t2 = time.perf_counter()
    be.save(res.model, dst)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "fuse": t2 - t1, "save": t3 - t2}


def profile_bnfuse(src: Path, dst: Path, top: int = 12) -> str:
    prof = cProfile.Profile()
    prof.enable()
    run_bnfuse(src, dst)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Machine and report
# ---------------------------------------------------------------------------------------


def fmt_ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.1f}"


def table(rows: list[Row]) -> list[str]:
    head = (
        "| model | BNs | params | file MB | bnfuse ms | ORT ms | ratio bnfuse/ORT "
        "| bnfuse no-fold ms | no-fold/ORT "
        "| BNs left bnfuse | BNs left ORT | folds all ORT folds | max diff bnfuse | max diff ORT |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.bns} | {r.params / 1e6:.2f}M | {r.size_mb:.1f} "
            f"| {r.bnfuse_ms:.1f} | {r.ort_ms:.1f} | **{r.ratio:.2f}** "
            f"| {r.floor_ms:.1f} | {r.floor_ms / r.ort_ms:.2f} "
            f"| {len(r.bnfuse_left)} | {len(r.ort_left)} | {'yes' if r.folds_ok else 'NO'} "
            f"| {r.err_bnfuse:.1e} | {r.err_ort:.1e} |"
        )
    return lines


def spread_table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | bnfuse runs ms (min / median / max) | ORT runs ms (min / median / max) "
        "| bnfuse load / fuse / save ms (one extra run) |",
        "|---|---|---|---|",
    ]
    for r in rows:

        def mm(xs: list[float]) -> str:
            return (
                f"{1000 * min(xs):.1f} / {1000 * statistics.median(xs):.1f} / {1000 * max(xs):.1f}"
            )

        ph = " / ".join(f"{1000 * r.phases[k]:.1f}" for k in ("load", "fuse", "save"))
        lines.append(f"| {r.name} | {mm(r.bnfuse_s)} | {mm(r.ort_s)} | {ph} |")
    return lines


def verdict(rows: list[Row]) -> list[str]:
    slow = [r for r in rows if not r.speed_ok]
    missed = [r for r in rows if not r.folds_ok]
    out = []
    if slow:
        out.append(
            f"- **Speed target missed on {len(slow)} of {len(rows)} models**: onnxruntime "
            "was faster on " + ", ".join(f"{r.name} ({r.ratio:.2f}x)" for r in slow) + "."
        )
    else:
        out.append(
            f"- Speed target met: bnfuse was no slower than onnxruntime on all {len(rows)} models."
        )
    if missed:
        for r in missed:
            out.append(
                f"- **Fold target missed on {r.name}**: onnxruntime folded {', '.join(r.missed)} "
                "but bnfuse left it."
            )
    else:
        out.append("- Fold target met: bnfuse folded every BN that onnxruntime folded.")
    extra = [(r.name, len(r.ort_left) - len(r.bnfuse_left)) for r in rows]
    extra = [(n, k) for n, k in extra if k > 0]
    if extra:
        out.append(
            "- bnfuse folded BNs that onnxruntime (ORT_ENABLE_BASIC) left: "
            + ", ".join(f"{n} (+{k})" for n, k in extra)
            + "."
        )
    for r in rows:
        if r.refusals:
            out.append(f"- {r.name}: bnfuse refused " + "; ".join(r.refusals))
    return out


def render_markdown(
    rows: list[Row], machine: dict[str, str], reps: int, errors: list[str], notes: list[str]
) -> str:
    lines = [
        "# bnfuse fold speed vs onnxruntime's offline optimizer",
        "",
        "Generated by `benchmarks/fold_speed.py` (see `benchmarks/README.md`). Do not edit by hand;",
        "rerun the script.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "## Method",
        "",
        "- bnfuse: `bnfuse.fuse(path, out, validate=False)` - load, fold, write.",
        "- onnxruntime: `InferenceSession(path, so)` with `ORT_ENABLE_BASIC` and "
        "`optimized_model_filepath` - load, optimize, write (session initialisation included, "
        "as that is what the offline optimizer costs).",
        "- bnfuse no-fold (a yardstick, not a contender): the same call with every rule "
        "skipped - load, checks, BNs found and refused, counts and the atomic write of an "
        "unchanged copy: the fixed cost a fold pass starts from.",
        f"- One untimed warm-up each, then {reps} timed runs each, interleaved "
        "(bnfuse, ORT, no-fold, no-fold, ORT, bnfuse, ...); the median is reported. "
        "Ratio < 1 means bnfuse is faster.",
        "- Each timed run writes a new file (the previous output is deleted untimed first), "
        "for both tools alike.",
        "- BNs left: BatchNormalization nodes in each written file (loaded with `onnx`).",
        "- Max diff: max |out - original| / max(1, max |original|) on random inputs (batch 2), "
        "all three models run in onnxruntime with optimizations disabled.",
        "",
        "## Results",
        "",
        *table(rows),
        "",
        "## Verdict",
        "",
        *verdict(rows),
        "",
        "## Spread and where bnfuse spends its time",
        "",
        *spread_table(rows),
        "",
        "## Models",
        "",
        *[f"- `{r.name}` ({r.nodes} nodes): {r.doc}" for r in rows],
        "",
    ]
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small subset (models.QUICK), 3 reps")
    p.add_argument("--models", help="comma-separated model names (default: all)")
    p.add_argument("--reps", type=int, help="timed runs per tool and model (default 11, quick 3)")
    p.add_argument(
        "--results",
        type=Path,
        help=f"Markdown results file (default: {DEFAULT_RESULTS.name} for a full run; "
        "--quick writes none unless given)",
    )
    p.add_argument("--profile", action="store_true", help="print a cProfile of one bnfuse run")
    p.add_argument(
        "--note", action="append", default=[], help="a line for the results file's Notes"
    )
    p.add_argument("--list", action="store_true", help="list the models and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, fn in bench_models.MODELS.items():
            mark = "*" if name in bench_models.QUICK else " "
            doc = " ".join((fn.__doc__ or "").split())
            print(f"{mark} {name:20s} {doc}")
        return 0
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in bench_models.MODELS]
        if unknown:
            print(f"unknown model(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
    else:
        names = list(bench_models.QUICK if args.quick else bench_models.MODELS)
    reps = args.reps or (3 if args.quick else 11)
    if reps < 1:
        print("--reps must be at least 1", file=sys.stderr)
        return 2
    results_path = args.results or (None if (args.quick or args.models) else DEFAULT_RESULTS)

    machine = machine_info()
    for k, v in machine.items():
        print(f"{k}: {v}")
    rows: list[Row] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bnfuse-fold-speed-") as tmp:
        work = Path(tmp)
        warm_up(work)
        for name in names:
            print(f"\n{name} ...", flush=True)
            try:
                row = bench_model(name, reps, work, args.profile)
            except Exception as exc:
                traceback.print_exc()
                errors.append(f"{name}: {one_line(exc)}")
                continue
            rows.append(row)
            print(
                f"  bnfuse {row.bnfuse_ms:.1f} ms  ORT {row.ort_ms:.1f} ms  ratio {row.ratio:.2f}  "
                f"no-fold {row.floor_ms:.1f} ms  "
                f"BNs left {len(row.bnfuse_left)}/{len(row.ort_left)} (bnfuse/ORT)  "
                f"diff {row.err_bnfuse:.1e}/{row.err_ort:.1e}",
                flush=True,
            )
            if row.profile:
                print(row.profile)
            for f in work.glob(f"{name}.*"):
                f.unlink()

    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(verdict(rows)))
    if errors:
        print("\nerrors:\n" + "\n".join(errors), file=sys.stderr)
    if results_path is not None and rows:
        results_path.write_text(render_markdown(rows, machine, reps, errors, args.note))
        print(f"\nwrote {results_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
