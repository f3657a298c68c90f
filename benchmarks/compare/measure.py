"""Measurement for the head-to-head: every tool on one ONNX model (nodes left, fold wall
time, max abs error vs a float64 evaluation, onnxruntime latency), bnfuse on one
``.keras`` model, and the warm-up that pays every tool's first-call costs untimed."""

from __future__ import annotations

import argparse
import functools
import gc
import math
import time
from pathlib import Path
from typing import Any

import models as bench_models
import numpy as np
import onnx
from _common import (
    log,
    one_line,
    ort_session,
    random_feeds,
    round_robin,
    session_feeds,
    timed,
)
from _float64 import Float64Reference
from _peers import TOOLS, run_tool
from affine_vs_ort import bn_equivalents

import bnfuse
from compare.cases import Case
from compare.results import (
    LEVELS,
    CaseResult,
    KerasResult,
    Lat,
    OnnxResult,
    ToolResult,
    wrong_limit,
)

ERROR_BATCH = 2  # rows per error evaluation (the float64 reference is numpy for convnets)
MIN_ROUNDS = 10
#: bnfuse folds that the issue expects to give it strictly fewer nodes left than peers
STRICT_RULES = ("gemm-bn", "matmul-bn", "conv-transpose-bn")


def _fold_summary(result: Any) -> tuple[dict[str, int], list[str]]:
    folds: dict[str, int] = {}
    for f in result.folds:
        key = f"{f.rule} ({f.direction})"
        folds[key] = folds.get(key, 0) + 1
    return folds, [f"{r.bn}: {r.reason}" for r in result.refusals]


def session(path: Path, level: str) -> Any:
    """A session as every measurement here uses it: CPU, one intra-op thread."""
    return ort_session(path, level, threads=1)


def _outputs_by_name(sess: Any, feeds: dict[str, np.ndarray], names: list[str]) -> list[Any]:
    got = sess.run(None, feeds)
    have = [o.name for o in sess.get_outputs()]
    if set(names) <= set(have):
        return [got[have.index(n)] for n in names]
    return list(got)  # a tool renamed the outputs: compare by position


def max_abs_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(ref) != len(got):
        raise ValueError(f"{len(got)} outputs, the original has {len(ref)}")
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        b64 = np.asarray(b, dtype=np.float64)
        if b64.shape != a.shape:
            raise ValueError(f"output shape {b64.shape}, the original's is {a.shape}")
        d = float(np.max(np.abs(b64 - a))) if a.size else 0.0
        worst = max(worst, d if math.isfinite(d) else math.inf)
    return worst


def latency(
    paths: dict[str, Path], level: str, seconds: float
) -> tuple[dict[str, Lat], dict[str, str]]:
    """Round-robin timing (order rotated every round) of every model at one level.

    Two onnxruntime sessions of the *same file* can differ in speed steadily by up to
    ~10%: on this VM the session created first in a batch is the slow one. So the budget is
    split into one block per model, each with fresh sessions, and in block ``b`` model
    ``b`` is created first; ratios are pooled over the blocks and also kept per block.
    """
    from bnfuse.bench import bootstrap_median_ci

    failed: dict[str, str] = {}
    keys = list(paths)
    blocks = len(keys)
    times: dict[str, list[list[float]]] = {k: [] for k in keys}
    feeds: dict[str, np.ndarray] = {}
    for b in range(blocks):
        sessions: dict[str, Any] = {}
        for k in keys[b % len(keys) :] + keys[: b % len(keys)]:
            if k in failed:
                continue
            try:
                sessions[k] = session(paths[k], level)
            except Exception as exc:
                failed[k] = one_line(exc)
        if "original" not in sessions:
            return {}, failed
        if not feeds:
            feeds = session_feeds(sessions["original"], seed=0)
        budget = seconds / blocks
        for k in list(sessions):
            try:
                t_end = time.perf_counter() + 0.05 * budget
                for j in range(20):
                    sessions[k].run(None, feeds)
                    if j >= 2 and time.perf_counter() > t_end:
                        break
            except Exception as exc:
                failed[k] = one_line(exc)
                del sessions[k]
        order = [k for k in keys if k in sessions]
        gc.collect()
        block = round_robin(sessions, feeds, budget, max(3, MIN_ROUNDS // blocks), order)
        for k, ts in block.items():
            times[k].append(ts)
        del sessions
        gc.collect()
    good = [k for k in keys if k not in failed and len(times[k]) == blocks]

    def ratios(base: str, k: str) -> tuple[np.ndarray, list[float]]:
        per = [np.asarray(a) / np.asarray(t) for a, t in zip(times[base], times[k], strict=True)]
        return np.concatenate(per), [float(np.median(x)) for x in per]

    out = {}
    for k in good:
        arr = np.concatenate([np.asarray(t) for t in times[k]])
        vs_o, blk_o = ratios("original", k)
        vs_b, blk_b = ratios("bnfuse", k) if "bnfuse" in good else (None, None)
        out[k] = Lat(
            median_ms=float(np.median(arr) * 1e3),
            p90_ms=float(np.percentile(arr, 90) * 1e3),
            vs_original=float(np.median(vs_o)),
            runs=int(arr.size),
            vs_bnfuse=float(np.median(vs_b)) if vs_b is not None else None,
            vs_original_ci=bootstrap_median_ci(vs_o),
            vs_bnfuse_ci=bootstrap_median_ci(vs_b) if vs_b is not None else None,
            blocks_vs_original=blk_o,
            blocks_vs_bnfuse=blk_b,
        )
    return out, failed


def fold_all(src: Path, outs: dict[str, Path], tools: dict[str, ToolResult], reps: int) -> Any:
    """Every tool folds ``src`` into ``outs[tool]``: one untimed warm-up per tool (it gives
    the output measured afterwards), then ``reps`` timed runs interleaved across tools, the
    order rotated every round. Returns bnfuse's result (None if it failed)."""
    bnfuse_result = None
    for t in TOOLS:
        try:
            out = run_tool(t, src, outs[t])
            if t == "bnfuse":
                bnfuse_result = out
        except Exception as exc:
            tools[t].failed = one_line(exc)
            log(f"  {t}: failed: {tools[t].failed}")
    order = [t for t in TOOLS if tools[t].ok]
    for i in range(reps):
        rot = order[i % len(order) :] + order[: i % len(order)] if order else []
        for t in rot:
            if not tools[t].ok:
                continue
            # a new file each time: replacing one makes the kernel free the old file's
            # pages inside the timed call (tens of ms at 100 MB), for any tool
            outs[t].unlink(missing_ok=True)
            try:
                dt, _ = timed(functools.partial(run_tool, t, src, outs[t]))
                tools[t].fold_s.append(dt)
            except Exception as exc:
                tools[t].failed = one_line(exc)
    log(
        "  fold ms: "
        + ", ".join(
            f"{t} {r.fold_ms:.1f}" if r.fold_ms is not None else f"{t} failed"
            for t, r in tools.items()
        )
    )
    return bnfuse_result


def errors(
    model: onnx.ModelProto,
    src: Path,
    outs: dict[str, Path],
    tools: dict[str, ToolResult],
    feeds: dict[str, np.ndarray],
) -> tuple[Float64Reference, list[np.ndarray], float, float]:
    """Max abs error of the original and of every tool's output (float32, onnxruntime
    ORT_DISABLE_ALL) against the float64 evaluation of the original; fills ``tools``.
    Returns the reference, its outputs, max|reference| and the original's own error."""
    t0 = time.perf_counter()
    ref64 = Float64Reference(model)
    ref = ref64.run(feeds)
    ref_s = time.perf_counter() - t0
    out_names = [o.name for o in model.graph.output]
    orig32 = _outputs_by_name(session(src, "ORT_DISABLE_ALL"), feeds, out_names)
    ref_max = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in ref)
    scale = max(1.0, ref_max)
    err_orig = max_abs_error(ref, orig32)
    for t, r in tools.items():
        if not r.ok:
            continue
        try:
            got = _outputs_by_name(session(outs[t], "ORT_DISABLE_ALL"), feeds, out_names)
            r.err_abs = max_abs_error(ref, got)
            r.err_rel = r.err_abs / scale
            r.wrong_above = wrong_limit(scale, err_orig)
        except Exception as exc:
            r.err_failed = one_line(exc)
    log(
        f"  float64 reference ({ref64.engine.split(' ')[0]}, {ref_s:.1f} s); max abs error: "
        f"original {err_orig:.2e}, "
        + ", ".join(
            f"{t} {r.err_abs:.2e}" if r.err_abs is not None else f"{t} -" for t, r in tools.items()
        )
    )
    return ref64, ref, ref_max, err_orig


def latencies(
    src: Path, outs: dict[str, Path], tools: dict[str, ToolResult], seconds: float
) -> dict[str, Lat]:
    """onnxruntime latency of the original and every tool's output at each level; fills
    ``tools`` and returns the original's."""
    lat_orig: dict[str, Lat] = {}
    for level in LEVELS:
        paths = {"original": src, **{t: outs[t] for t, r in tools.items() if r.ok}}
        lat, failed = latency(paths, level, seconds)
        if "original" in lat:
            lat_orig[level] = lat.pop("original")
        for t, v in lat.items():
            tools[t].latency[level] = v
        for t, why in failed.items():
            if t in tools:
                tools[t].latency_failed[level] = why
    log(
        "  ORT_ENABLE_ALL ms: "
        + (f"original {lat_orig['ORT_ENABLE_ALL'].median_ms:.3f}, " if lat_orig else "")
        + ", ".join(
            f"{t} {r.latency['ORT_ENABLE_ALL'].median_ms:.3f}"
            for t, r in tools.items()
            if "ORT_ENABLE_ALL" in r.latency
        )
    )
    return lat_orig


def bench_onnx(
    name: str, src: Path, feeds: dict[str, np.ndarray] | None, work: Path, args: argparse.Namespace
) -> tuple[OnnxResult, dict[str, np.ndarray], list[np.ndarray]]:
    """Every tool on one ONNX file; returns the result, the error inputs and the reference."""
    model = onnx.load(str(src))
    bn, affine, nodes = bn_equivalents(src)
    outs = {t: work / f"{name}.{t}.onnx" for t in TOOLS}
    tools = {t: ToolResult(t) for t in TOOLS}
    bnfuse_result = fold_all(src, outs, tools, args.reps)

    # nodes left
    for t, r in tools.items():
        if r.ok:
            try:
                r.bn, r.affine, r.nodes = bn_equivalents(outs[t])
            except Exception as exc:
                r.failed = f"output unreadable: {one_line(exc)}"

    if feeds is None:
        feeds = random_feeds(model, seed=1, batch=ERROR_BATCH)
    ref64, ref, ref_max, err_orig = errors(model, src, outs, tools, feeds)
    lat_orig = latencies(src, outs, tools, args.seconds)

    folds, refusals = _fold_summary(bnfuse_result) if bnfuse_result is not None else ({}, [])
    strict: list[str] = []
    if bnfuse_result is not None:
        strict = sorted(
            {f.rule for f in bnfuse_result.folds if f.rule in STRICT_RULES}
            | {f"{f.rule} (forward)" for f in bnfuse_result.folds if f.direction == "forward"}
        )
    res = OnnxResult(
        file=src.name,
        size_mb=src.stat().st_size / 1e6,
        nodes=nodes,
        bn=bn,
        affine=affine,
        error_inputs={k: list(v.shape) for k, v in feeds.items()},
        reference=ref64.engine,
        reference_note=(
            f"onnxruntime has no float64 kernel: {ref64.fallback_reason}"
            if ref64.fallback_reason
            else ""
        ),
        ref_max_abs=ref_max,
        err_original_abs=err_orig,
        err_original_rel=err_orig / max(1.0, ref_max),
        latency_original=lat_orig,
        tools=tools,
        folds=folds,
        refusals=refusals,
        strict_kinds=strict,
    )
    for p in outs.values():
        p.unlink(missing_ok=True)
    return res, feeds, ref


def bench_keras(
    name: str,
    src: Path,
    feeds: dict[str, np.ndarray] | None,
    ref: list[np.ndarray] | None,
    work: Path,
    args: argparse.Namespace,
) -> KerasResult:
    """bnfuse on a .keras file: fold time, BN layers left, error, tf.function latency."""
    import bnfuse.bench as bbench
    from bnfuse.keras.backend import KerasBackend

    dst = work / f"{name}.bnfuse.keras"
    result = bnfuse.fuse(src, dst, validate=False)  # warm-up; its report is the one kept
    fold_s = []
    for _ in range(args.keras_reps):
        dst.unlink(missing_ok=True)
        dt, _ = timed(lambda: bnfuse.fuse(src, dst, validate=False))
        fold_s.append(dt)
    folds, refusals = _fold_summary(result)
    res = KerasResult(
        file=src.name,
        size_mb=src.stat().st_size / 1e6,
        bns_before=result.before.bn_nodes,
        bns_after=result.after.bn_nodes,
        fold_s=fold_s,
        folds=folds,
        refusals=refusals,
    )
    log(
        f"  keras: {res.bns_before} -> {res.bns_after} BN layers, fold "
        f"{res.fold_ms:.0f} ms (.keras -> .keras)"
    )
    be = KerasBackend()
    original, fused = be.load(src), be.load(dst)
    if feeds is not None and ref is not None:
        x = next(iter(feeds.values()))
        try:
            runs = [be.runner(m) for m in (original, fused)]
            name0 = runs[0].inputs[0].name
            outs = [r.run({name0: x}) for r in runs]
            res.err_original_abs = max_abs_error(ref, outs[0])
            res.err_fused_abs = max_abs_error(ref, outs[1])
            res.err_note = "vs the float64 evaluation of the model's ONNX export"
        except Exception as exc:
            res.err_note = f"failed: {one_line(exc)}"
    try:
        pair = [
            [t for t in be.bench_targets(m, 1) if t.runtime == "keras tf.function"]
            for m in (original, fused)
        ]
        bench = bbench.run(
            pair[0],
            pair[1],
            be.runner(original).inputs,
            batches=(1,),
            threads=1,
            seconds=args.seconds,
            input_shapes={},
            progress=None,
        )
        row = bench.rows[0]
        res.tf_original_ms = row.original.median_ms
        res.tf_fused_ms = row.fused.median_ms
        res.tf_speedup = row.speedup
        res.tf_speedup_ci = row.speedup_ci
        res.tf_runs = row.original.runs
        log(
            f"  tf.function ms: original {res.tf_original_ms:.3f}, bnfuse "
            f"{res.tf_fused_ms:.3f} ({res.tf_speedup:.2f}x)"
        )
    except Exception as exc:
        res.tf_failed = one_line(exc)
    dst.unlink(missing_ok=True)
    return res


def bench_case(case: Case, work: Path, args: argparse.Namespace) -> CaseResult:
    t0 = time.perf_counter()
    prep = case.prepare(work)
    res = CaseResult(case.name, case.group, case.doc, list(prep.notes))
    log(f"  prepared in {time.perf_counter() - t0:.1f} s")
    feeds = ref = None
    if prep.onnx is not None:
        res.onnx, feeds, ref = bench_onnx(case.name, prep.onnx, prep.feeds, work, args)
    if prep.keras is not None:
        res.keras = bench_keras(case.name, prep.keras, feeds, ref, work, args)
    res.seconds = time.perf_counter() - t0
    return res


def warm_up(work: Path) -> None:
    """Pay every tool's first-call costs (imports, library init) outside any timing."""
    src = work / "warmup.onnx"
    onnx.save(bench_models.build("small_mixed"), str(src))
    for t in TOOLS:
        try:
            run_tool(t, src, work / f"warmup.{t}.onnx")
        except Exception as exc:
            log(f"warm-up: {t} failed: {one_line(exc)}")
    Float64Reference(onnx.load(str(src)))
