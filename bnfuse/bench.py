"""Latency before/after, timed interleaved so machine drift hits both models alike.

Imports numpy only. For every runtime setting (one :class:`~bnfuse.backend.BenchTarget`
pair: original and fused, same ``runtime`` label) and every batch size:

1. ``prepare()`` each side once per runtime (session creation, tracing): ``setup_ms``.
2. Call each side once on the row's inputs and time it alone: ``first_run_ms``.
3. Warm up both sides (at least 2 runs each).
4. Time pairs A B, B A, A B ... (the first of each pair alternates to cancel order
   effects) until the row's share of ``seconds`` is spent, with at least
   :data:`MIN_PAIRS` and at most :data:`MAX_PAIRS` pairs. The garbage collector is off
   while timing. Rows that stop at :data:`MAX_PAIRS` before their share of ``seconds``
   is spent are named in a note.

Speedup is the median of the paired ratios original/fused (> 1: the fused model is
faster) with a seeded bootstrap 95% confidence interval. Inputs are random
(:func:`bnfuse.inputs.random_feeds`, seed 0); a symbolic leading dim takes the batch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnfuse.backend import BenchTarget, InputSpec
from bnfuse.errors import (
    BnfuseError,
    FusionInvariantError,
    UnsupportedModelError,
    UsageError,
    first_line,
)
from bnfuse.inputs import random_feeds, resolve_shape
from bnfuse.result import BenchResult, LatencyRow, LatencyStats

__all__ = [
    "MAX_PAIRS",
    "MIN_PAIRS",
    "ORT_FOLDS_NOTE",
    "bootstrap_median_ci",
    "latency_stats",
    "machine_info",
    "run",
]

#: Said whenever onnxruntime is timed: the unfused reference is not what ORT really runs.
ORT_FOLDS_NOTE = (
    "onnxruntime already folds Conv+BatchNormalization itself at ORT_ENABLE_BASIC and above, "
    "including the default ORT_ENABLE_ALL, so the gain at ORT_ENABLE_ALL comes only from "
    "patterns it does not fold"
)

MIN_PAIRS = 5
MAX_PAIRS = 2000
WARMUP_MIN = 2
WARMUP_MAX = 20
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
INPUT_SEED = 0

Progress = Callable[[str, float, float | None], None]
RunFn = Callable[[Mapping[str, np.ndarray]], Any]


def latency_stats(times_s: Sequence[float] | np.ndarray, batch: int) -> LatencyStats:
    """Median, p90, p99, mean, std (ddof 1), min and throughput of run times in seconds."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    if t.size == 0:
        raise ValueError("latency_stats needs at least one run")
    med, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    return LatencyStats(
        median_ms=med,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(np.mean(t)),
        std_ms=float(np.std(t, ddof=1)) if t.size > 1 else 0.0,
        runs=int(t.size),
        throughput=batch / (med / 1e3) if med > 0 else float("inf"),
        min_ms=float(np.min(t)),
    )


def bootstrap_median_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_median_ci needs at least one value")
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(1, v.size))  # bound the index matrix's memory
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        idx = rng.integers(0, v.size, size=(n, v.size))
        medians[start : start + n] = np.median(v[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(medians, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, OS and library versions.

    Framework versions come from package metadata; nothing heavy is imported.
    """
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "arch": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _dist_version("onnxruntime"),
        "tensorflow": _dist_version("tensorflow"),
    }


def _fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The fixed leading dim shared by the inputs, if any input fixes one."""
    for s in specs:
        if s.shape and isinstance(s.shape[0], int) and s.shape[0] >= 0:
            return s.shape[0]
    return None


def _batch_ok(specs: Sequence[InputSpec], batch: int) -> str | None:
    """None when every input can take ``batch`` rows, else why not."""
    for s in specs:
        if s.shape and isinstance(s.shape[0], int) and s.shape[0] >= 0 and s.shape[0] != batch:
            return f"input {s.name!r} has a fixed batch dimension of {s.shape[0]}"
    return None


def _timed(fn: RunFn, feeds: Mapping[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    fn(feeds)
    return time.perf_counter() - t0


class _Progress:
    def __init__(self, cb: Progress | None, total: float) -> None:
        self.cb, self.total, self.last = cb, total, 0.0

    def __call__(self, what: str, done: float, force: bool = False) -> None:
        now = time.perf_counter()
        if self.cb is not None and (force or now - self.last >= 0.1):
            self.last = now
            self.cb(what, min(done, self.total), self.total)


def _time_row(
    fa: RunFn,
    fb: RunFn,
    feeds: Mapping[str, np.ndarray],
    budget_s: float,
    tick: Callable[[float], None],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Warm up, then time interleaved pairs.

    Returns (original times, fused times) in s and the wall time the timed loop took.
    """
    warm_until = time.perf_counter() + 0.1 * budget_s
    for i in range(WARMUP_MAX):
        if i >= WARMUP_MIN and time.perf_counter() >= warm_until:
            break
        fa(feeds)
        fb(feeds)
    ta: list[float] = []
    tb: list[float] = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    elapsed = 0.0
    try:
        while len(ta) < MAX_PAIRS:
            if len(ta) % 2 == 0:
                ta.append(_timed(fa, feeds))
                tb.append(_timed(fb, feeds))
            else:
                tb.append(_timed(fb, feeds))
                ta.append(_timed(fa, feeds))
            elapsed = time.perf_counter() - start
            tick(min(1.0, elapsed / budget_s) if budget_s > 0 else 1.0)
            if len(ta) >= MIN_PAIRS and elapsed >= budget_s:
                break
    finally:
        if was_enabled:
            gc.enable()
    return np.asarray(ta), np.asarray(tb), elapsed


@contextlib.contextmanager
def _documented(what: str) -> Iterator[None]:
    """Turn a runtime's own exception into ``UnsupportedModelError`` (one line)."""
    try:
        yield
    except BnfuseError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(f"{what} fails to run: {first_line(exc)}") from None


def _check_run(
    orig_targets: list[BenchTarget],
    fused_targets: list[BenchTarget],
    batches: Sequence[int],
    seconds: float,
) -> None:
    """:func:`run`'s arguments: usable batch sizes and budget, targets that pair up."""
    if not batches or any(b < 1 for b in batches):
        raise UsageError("batch sizes must be at least 1")
    if not seconds > 0:
        raise UsageError("--bench-seconds must be positive")
    if len(orig_targets) != len(fused_targets) or any(
        a.runtime != b.runtime for a, b in zip(orig_targets, fused_targets, strict=False)
    ):
        raise FusionInvariantError(
            "benchmark targets of the original and fused model do not pair up",
            original=[t.runtime for t in orig_targets],
            fused=[t.runtime for t in fused_targets],
        )


def _usable_batches(
    specs: Sequence[InputSpec],
    batches: Sequence[int],
    input_shapes: Mapping[str, Sequence[int]],
    notes: list[str],
) -> list[int]:
    """The batch sizes the model's inputs take (each once, in order; the model's own
    fixed batch when none does), a note in ``notes`` for each one left out. Raises on an
    input shape that cannot be resolved, before any session is built."""
    use_batches: list[int] = []
    for b in dict.fromkeys(batches):  # unique, in order
        why = _batch_ok(specs, b)
        if why is None:
            use_batches.append(b)
        else:
            notes.append(f"batch {b} skipped: {why}")
    fixed = _fixed_batch(specs)
    if not use_batches and fixed is not None and fixed >= 1 and _batch_ok(specs, fixed) is None:
        use_batches = [fixed]
        notes.append(f"the model's batch size is fixed at {fixed}; timed at batch {fixed}")
    for b in use_batches:  # fail on unusable shapes before any session is built
        for s in specs:
            resolve_shape(s, input_shapes, b)
    return use_batches


def _latency_row(
    rt: str, b: int, times_a: np.ndarray, times_b: np.ndarray, note: str
) -> LatencyRow:
    """One row of paired timings (seconds) of the original (a) and the fused model (b)."""
    ratios = times_a / np.maximum(times_b, 1e-9)
    return LatencyRow(
        runtime=rt,
        batch=b,
        original=latency_stats(times_a, b),
        fused=latency_stats(times_b, b),
        speedup=float(np.median(ratios)),
        speedup_ci=bootstrap_median_ci(ratios),
        note=note,
        original_ms=tuple((times_a * 1e3).tolist()),
        fused_ms=tuple((times_b * 1e3).tolist()),
    )


def run(
    orig_targets: list[BenchTarget],
    fused_targets: list[BenchTarget],
    specs: Sequence[InputSpec],
    *,
    batches: Sequence[int],
    threads: int,
    seconds: float,
    input_shapes: Mapping[str, Sequence[int]],
    progress: Progress | None,
) -> BenchResult:
    """Time the original against the fused model at every runtime setting and batch size.

    Args:
        orig_targets, fused_targets: the backend's runtime settings for each model, paired
            by position (their ``runtime`` labels must match).
        specs: the models' inputs (used to make random inputs per batch size).
        batches: batch sizes; a batch a fixed leading dim cannot take is skipped with a
            note (when none fits, the model's own fixed batch is timed instead).
        threads: intra-op threads the targets were built with (recorded only).
        seconds: budget for the interleaved timing loops, split evenly across rows
            (setup, first runs and warm-up come on top; every row runs at least
            :data:`MIN_PAIRS` pairs, at most :data:`MAX_PAIRS`).
        input_shapes: shapes for inputs with symbolic non-leading dims.
        progress: ``progress(description, completed_rows, total_rows)``.

    The callables from ``prepare()`` must block until the outputs are ready.

    Raises:
        UsageError: bad batch sizes or budget, or an input shape that cannot be resolved.
        FusionInvariantError: the two target lists do not pair up.
    """
    _check_run(orig_targets, fused_targets, batches, seconds)
    notes: list[str] = []
    use_batches = _usable_batches(specs, batches, input_shapes, notes)

    n_rows = len(orig_targets) * len(use_batches)
    row_budget = seconds / max(1, n_rows)
    report = _Progress(progress, float(max(1, n_rows)))
    rows: list[LatencyRow] = []
    setup_ms: dict[str, float] = {}
    first_run_ms: dict[str, float] = {}
    capped: list[str] = []  # rows that hit MAX_PAIRS before their budget was spent
    done = 0
    for ta, tb in zip(orig_targets, fused_targets, strict=True):
        rt = ta.runtime
        if not use_batches:
            continue
        report(f"preparing {rt}", done, force=True)
        fns: list[RunFn] = []
        for side, target in (("original", ta), ("fused", tb)):
            t0 = time.perf_counter()
            with _documented(f"{rt}: the {side} model"):
                fns.append(target.prepare())
            setup_ms[f"{rt} {side}"] = (time.perf_counter() - t0) * 1e3
        fa, fb = fns
        for b in use_batches:
            what = f"timing {rt}, batch {b}"
            report(what, done, force=True)
            x = random_feeds(specs, 1, INPUT_SEED, input_shapes, batch=b)[0]
            with _documented(f"{rt}: the original model"):
                first_run_ms[f"{rt} original batch={b}"] = _timed(fa, x) * 1e3
            with _documented(f"{rt}: the fused model"):
                first_run_ms[f"{rt} fused batch={b}"] = _timed(fb, x) * 1e3

            def tick(frac: float, base: int = done, what: str = what) -> None:
                report(what, base + frac)

            times_a, times_b, elapsed = _time_row(fa, fb, x, row_budget, tick)
            if len(times_a) >= MAX_PAIRS and elapsed < row_budget:
                capped.append(f"{rt} batch {b}")
            note = "; ".join(dict.fromkeys(n for n in (ta.note, tb.note) if n))
            rows.append(_latency_row(rt, b, times_a, times_b, note))
            done += 1
            report(what, done, force=True)
    if rows and rows[0].note and len({r.note for r in rows}) == 1:
        notes.append(rows[0].note)  # the same note on every row: say it once
        rows = [dataclasses.replace(r, note="") for r in rows]
    if capped:
        notes.append(
            f"stopped at the maximum of {MAX_PAIRS} timed pairs before the row's "
            f"{row_budget:.3g} s time budget was used: {', '.join(capped)}"
        )
    if any(t.runtime.startswith("onnxruntime") for t in orig_targets):
        notes.append(ORT_FOLDS_NOTE)
    return BenchResult(
        rows=tuple(rows),
        setup_ms=setup_ms,
        first_run_ms=first_run_ms,
        threads=threads,
        machine=machine_info(),
        notes=tuple(notes),
        seconds=float(seconds),
    )
