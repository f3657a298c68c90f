"""Head-to-head benchmark: bnfuse vs onnxruntime, onnxoptimizer, onnxslim and onnxscript.

One command, every model, one process. For each ONNX model and each tool (see
``benchmarks/_peers.py`` for the exact calls), in one run:

* BN and BN-equivalent ``Mul``/``Add`` nodes left in the tool's written file
  (``affine_vs_ort.bn_equivalents``);
* fold wall time file -> file (read, transform, write), one untimed warm-up per tool,
  then ``--reps`` runs per tool interleaved across tools (order rotated every round);
  median;
* max abs error of the tool's output (float32, onnxruntime ORT_DISABLE_ALL) against a
  float64 evaluation of the original (``benchmarks/_float64.py``);
* onnxruntime latency of the original and of every tool's output at ORT_DISABLE_ALL and
  ORT_ENABLE_ALL (1 thread, batch 1, round-robin interleaved, ``--seconds`` per level);
  median and the median of paired original/variant ratios.

For Keras models (the sample ``.keras`` files and keras.applications built with
``weights=None`` and randomized BN statistics) bnfuse also folds the ``.keras`` file, and
``model(x, training=False)`` under ``tf.function`` is timed original vs fused; the
applications' ONNX exports (``model.export(format="onnx")``) go through the table above.

    .venv/bin/python benchmarks/run.py                    # everything; writes RESULTS-compare.md,
                                                          # RESULTS.json and RESULTS.md's section
    .venv/bin/python benchmarks/run.py --quick            # small subset, prints only
    .venv/bin/python benchmarks/run.py --models digits_cnn_bn,grouped_deconv
    .venv/bin/python benchmarks/run.py --list

Missing a target is reported (tables, Verdict), never an error: the exit status is 1 only
if a model crashed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import gc
import importlib.metadata
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # fallback when bnfuse is not installed

# bnfuse first: affine_vs_ort puts the checkout first on sys.path, and a PYTHONPATH
# snapshot of bnfuse (see benchmarks/README.md) must win over it.
import bnfuse  # noqa: E402

# isort: split
import models as bench_models  # noqa: E402
from _float64 import Float64Reference  # noqa: E402
from _peers import CALLS, PEERS, TOOLS, quiet, run_tool  # noqa: E402
from affine_vs_ort import bn_equivalents, randomize_bn  # noqa: E402
from fold_speed import bnfuse_provenance, random_feeds, timed  # noqa: E402

SAMPLES = ROOT / "sample_models"
RESULTS_MD = HERE / "RESULTS-compare.md"
RESULTS_JSON = HERE / "RESULTS.json"
SUMMARY_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- run.py:begin -->", "<!-- run.py:end -->"

LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
#: an output whose error exceeds this (relative to max(1, max|reference|)) is wrong
WRONG_REL = 1e-3
#: latency ratios within this are ties (timing noise)
LAT_TOL = 0.03
ERROR_BATCH = 2  # rows per error evaluation (the float64 reference is numpy for convnets)
MIN_ROUNDS = 10

# ---------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Files of one case (in the work dir or sample_models/) and its evaluation inputs."""

    onnx: Path | None
    keras: Path | None
    feeds: dict[str, np.ndarray] | None = None  # error-evaluation inputs; None: random
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # "sample", "keras.applications", "hand-built"
    doc: str
    prepare: Callable[[Path], Prepared]
    keras: bool = False  # has a .keras model (TensorFlow needed)


def _sample(name: str, keras_too: bool) -> Callable[[Path], Prepared]:
    def prepare(work: Path) -> Prepared:
        src = SAMPLES / f"{name}.onnx"
        data = np.load(SAMPLES / "digits_test.npz", allow_pickle=False)
        model = onnx.load(str(src), load_external_data=False)
        feeds = {
            i.name: np.asarray(data[i.name][:8], dtype=np.float32)
            for i in model.graph.input
            if i.name in data.files
        }
        return Prepared(
            onnx=src,
            keras=SAMPLES / f"{name}.keras" if keras_too else None,
            feeds=feeds or None,
            notes=["inputs: the first 8 images of sample_models/digits_test.npz"],
        )

    return prepare


def _hand_built(name: str) -> Callable[[Path], Prepared]:
    def prepare(work: Path) -> Prepared:
        path = work / f"{name}.onnx"
        onnx.save(bench_models.build(name), str(path))
        return Prepared(onnx=path, keras=None)

    return prepare


#: keras.applications: (class name, input resolution). 96x96 keeps a full run feasible on
#: 2 cores; it is above every architecture's minimum (Xception 71, InceptionV3 75).
KERAS_APPS: dict[str, tuple[str, int]] = {
    "mobilenetv2_96": ("MobileNetV2", 96),
    "resnet50_96": ("ResNet50", 96),
    "resnet50v2_96": ("ResNet50V2", 96),
    "efficientnetb0_96": ("EfficientNetB0", 96),
    "densenet121_96": ("DenseNet121", 96),
    "xception_96": ("Xception", 96),
    "nasnetmobile_96": ("NASNetMobile", 96),
    "inceptionv3_96": ("InceptionV3", 96),
}


def _bake_export_inputs(model: Any, proto: onnx.ModelProto) -> list[str]:
    """Turn the extra graph inputs of a Keras export into initializers; returns notes.

    Keras 3 exports a ``Normalization`` layer's mean/variance (tensors captured by the
    traced function, e.g. in EfficientNetB0) as additional *required graph inputs*
    ``.../normalization_1/Sub/y:0`` and ``.../Sqrt/x:0``. They are set to the layer's own
    values so that the ONNX model has the Keras model's single input and semantics.
    """
    import keras

    norms = {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.Normalization)
    }
    notes = []
    for vi in list(proto.graph.input)[1:]:
        m = re.search(r"([^/]+)/(Sub/y|Sqrt/x):0$", vi.name)
        layer = None
        if m:
            scope = m.group(1)
            layer = norms.get(scope) or norms.get(re.sub(r"_\d+$", "", scope))
        if layer is None:
            raise RuntimeError(f"Keras export has an unexplained extra input {vi.name!r}")
        value = layer.mean if m and m.group(2) == "Sub/y" else layer.variance
        arr = np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float32)
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        arr = arr.reshape(dims)
        proto.graph.input.remove(vi)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, vi.name))
        notes.append(
            f"the export takes `{vi.name}` (Normalization layer `{layer.name}`) as a graph "
            f"input; run.py stores the layer's value ({np.round(arr.ravel(), 3).tolist()}) "
            "as an initializer instead"
        )
    return notes


def _keras_app(name: str, cls: str, size: int) -> Callable[[Path], Prepared]:
    def prepare(work: Path) -> Prepared:
        import keras

        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        ctor = getattr(keras.applications, cls)
        model = ctor(
            weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
        )
        bns = randomize_bn(model, seed=len(name))
        kpath, opath = work / f"{name}.keras", work / f"{name}.onnx"
        model.save(str(kpath))
        spec = [keras.InputSpec(shape=(None, size, size, 3), dtype="float32")]
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            model.export(str(opath), format="onnx", verbose=False, input_signature=spec)
        proto = onnx.load(str(opath))
        notes = _bake_export_inputs(model, proto)
        if notes:
            onnx.save(proto, str(opath))
        notes.insert(
            0,
            f"keras.applications.{cls}(weights=None, input_shape=({size}, {size}, 3), "
            f"classes=10, classifier_activation=None), {bns} BN layers with randomized "
            "statistics; ONNX via model.export(format='onnx') (tf2onnx)",
        )
        del model
        keras.backend.clear_session()
        gc.collect()
        return Prepared(onnx=opath, keras=kpath, notes=notes)

    return prepare


def _doc(fn: Callable[..., Any]) -> str:
    return " ".join((fn.__doc__ or "").split())


CASES: dict[str, Case] = {
    "digits_mlp": Case(
        "digits_mlp",
        "sample",
        "trained digits MLP; .keras (input-standardizing BN forward through Flatten, "
        "Dense->BN, BN after an activation) and its Keras ONNX export (BNs as Mul+Add)",
        _sample("digits_mlp", True),
        keras=True,
    ),
    "digits_cnn": Case(
        "digits_cnn",
        "sample",
        "trained digits CNN; .keras (Conv2D/DepthwiseConv2D/SeparableConv2D->BN, "
        "ReLU->BN->valid Conv2D) and its Keras ONNX export",
        _sample("digits_cnn", True),
        keras=True,
    ),
    "digits_cnn_bn": Case(
        "digits_cnn_bn",
        "sample",
        "trained digits CNN built with real BatchNormalization nodes (Conv->BN, grouped "
        "Conv->BN, MaxPool->BN->Flatten->Gemm, Gemm->BN)",
        _sample("digits_cnn_bn", False),
    ),
    **{
        name: Case(
            name,
            "keras.applications",
            f"keras.applications.{cls} at {size}x{size}, weights=None, randomized BN "
            "statistics; the .keras model and its ONNX export",
            _keras_app(name, cls, size),
            keras=True,
        )
        for name, (cls, size) in KERAS_APPS.items()
    },
    **{
        name: Case(name, "hand-built", _doc(bench_models.MODELS[name]), _hand_built(name))
        for name in ("gemm_bn_mlp", "matmul_add_bn_mlp", "grouped_deconv", "bn_gemm_mlp")
    },
    **{  # as exporters write them (computed constants, layout ops): see exporters.py
        name: Case(name, "hand-built", _doc(bench_models.MODELS[name]), _hand_built(name))
        for name in bench_models.EXPORTER_MODELS
    },
}
QUICK = (
    "digits_mlp",
    "digits_cnn_bn",
    "mobilenetv2_96",
    "gemm_bn_mlp",
    "matmul_add_bn_mlp",
    "grouped_deconv",
    "bn_gemm_mlp",
)

# ---------------------------------------------------------------------------------------
# Results (JSON-ready dataclasses)
# ---------------------------------------------------------------------------------------


@dataclass
class Lat:
    median_ms: float
    p90_ms: float
    vs_original: float  # median of paired original/variant ratios (> 1: faster)
    runs: int
    vs_bnfuse: float | None = None  # median of paired bnfuse/variant ratios (> 1: faster)
    vs_original_ci: tuple[float, float] | None = None  # bootstrap 95% CIs of those medians
    vs_bnfuse_ci: tuple[float, float] | None = None
    blocks_vs_original: list[float] | None = None  # the paired ratio of each session block
    blocks_vs_bnfuse: list[float] | None = None


@dataclass
class ToolResult:
    tool: str
    failed: str = ""  # "" or the one-line reason the tool raised
    fold_s: list[float] = field(default_factory=list)
    bn: int | None = None
    affine: int | None = None
    nodes: int | None = None
    err_abs: float | None = None
    err_rel: float | None = None
    err_failed: str = ""
    wrong_above: float | None = None  # see wrong_limit()
    latency: dict[str, Lat] = field(default_factory=dict)
    latency_failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def wrong(self) -> bool:
        """The output does not compute the original's function (or cannot be run)."""
        if self.err_failed:
            return True
        if self.err_abs is None or self.wrong_above is None:
            return False
        return not self.err_abs <= self.wrong_above

    @property
    def valid(self) -> bool:
        return self.ok and not self.wrong

    @property
    def left(self) -> int | None:
        return None if self.bn is None or self.affine is None else self.bn + self.affine

    @property
    def fold_ms(self) -> float | None:
        return 1000 * statistics.median(self.fold_s) if self.fold_s else None


@dataclass
class OnnxResult:
    file: str
    size_mb: float
    nodes: int
    bn: int
    affine: int
    error_inputs: dict[str, list[int]]
    reference: str
    reference_note: str
    ref_max_abs: float
    err_original_abs: float
    err_original_rel: float
    latency_original: dict[str, Lat] = field(default_factory=dict)
    tools: dict[str, ToolResult] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)  # rule (direction) -> count
    refusals: list[str] = field(default_factory=list)
    strict_kinds: list[str] = field(default_factory=list)  # why strictly fewer is expected


@dataclass
class KerasResult:
    file: str
    size_mb: float
    bns_before: int
    bns_after: int
    fold_s: list[float]
    folds: dict[str, int]
    refusals: list[str]
    err_original_abs: float | None = None
    err_fused_abs: float | None = None
    err_note: str = ""
    tf_original_ms: float | None = None
    tf_fused_ms: float | None = None
    tf_speedup: float | None = None
    tf_speedup_ci: tuple[float, float] | None = None
    tf_runs: int = 0
    tf_failed: str = ""

    @property
    def fold_ms(self) -> float:
        return 1000 * statistics.median(self.fold_s)


@dataclass
class CaseResult:
    name: str
    group: str
    doc: str
    notes: list[str]
    onnx: OnnxResult | None = None
    keras: KerasResult | None = None
    seconds: float = 0.0


def wrong_limit(scale: float, err_original: float) -> float:
    """An output is wrong above this max abs error: WRONG_REL * max(1, max|reference|), or
    10x the unfused original's own float32 error when that is larger (an ill-conditioned
    model, where float32 itself is that far from float64)."""
    return max(WRONG_REL * scale, 10 * err_original)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:240] if first else type(exc).__name__


def _fold_summary(result: Any) -> tuple[dict[str, int], list[str]]:
    folds: dict[str, int] = {}
    for f in result.folds:
        key = f"{f.rule} ({f.direction})"
        folds[key] = folds.get(key, 0) + 1
    return folds, [f"{r.bn}: {r.reason}" for r in result.refusals]


#: bnfuse folds that the issue expects to give it strictly fewer nodes left than peers
STRICT_RULES = ("gemm-bn", "matmul-bn", "conv-transpose-bn")

# ---------------------------------------------------------------------------------------
# onnxruntime helpers
# ---------------------------------------------------------------------------------------


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def session(path: Path, level: str, threads: int = 1) -> Any:
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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
            r = np.random.default_rng(0)
            for i in sessions["original"].get_inputs():
                shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
                feeds[i.name] = r.normal(0, 1, shape).astype(np.float32)
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
        block: dict[str, list[float]] = {k: [] for k in sessions}
        order = [k for k in keys if k in sessions]
        gc.collect()
        gc.disable()
        try:
            end = time.perf_counter() + budget
            rounds = 0
            while rounds < max(3, MIN_ROUNDS // blocks) or time.perf_counter() < end:
                order = order[1:] + order[:1]
                for k in order:
                    t0 = time.perf_counter()
                    sessions[k].run(None, feeds)
                    block[k].append(time.perf_counter() - t0)
                rounds += 1
        finally:
            gc.enable()
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


# ---------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_onnx(
    name: str, src: Path, feeds: dict[str, np.ndarray] | None, work: Path, args: argparse.Namespace
) -> tuple[OnnxResult, dict[str, np.ndarray], list[np.ndarray]]:
    """Every tool on one ONNX file; returns the result, the error inputs and the reference."""
    model = onnx.load(str(src))
    bn, affine, nodes = bn_equivalents(src)
    outs = {t: work / f"{name}.{t}.onnx" for t in TOOLS}
    tools = {t: ToolResult(t) for t in TOOLS}

    # fold: one untimed warm-up per tool (gives the output), then interleaved reps
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
    for i in range(args.reps):
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

    # nodes left
    for t, r in tools.items():
        if r.ok:
            try:
                r.bn, r.affine, r.nodes = bn_equivalents(outs[t])
            except Exception as exc:
                r.failed = f"output unreadable: {one_line(exc)}"

    # max abs error vs the float64 evaluation of the original
    if feeds is None:
        feeds = random_feeds(model, seed=1, batch=ERROR_BATCH)
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

    # latency of the original and every output, per level
    lat_orig: dict[str, Lat] = {}
    for level in LEVELS:
        paths = {"original": src, **{t: outs[t] for t, r in tools.items() if r.ok}}
        lat, failed = latency(paths, level, args.seconds)
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
        err_original_rel=err_orig / scale,
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


# ---------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------


def err_tol(o: OnnxResult) -> float:
    """Errors closer than this are float32 rounding noise: the unfused original's own
    float32 error vs float64, at least 1e-7 * max(1, max|reference|)."""
    return max(o.err_original_abs, 1e-7 * max(1.0, o.ref_max_abs))


def peers_valid(o: OnnxResult) -> dict[str, ToolResult]:
    return {t: o.tools[t] for t in PEERS if t in o.tools and o.tools[t].valid}


def _best(values: Mapping[str, float | int | None]) -> tuple[list[str], float | None]:
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


def checks(results: list[CaseResult]) -> list[Check]:
    out: list[Check] = []
    for c in results:
        o = c.onnx
        if o is not None:
            label = f"{c.name}.onnx"
            b = o.tools["bnfuse"]
            peers = peers_valid(o)
            if not b.valid:
                why = b.failed or b.err_failed or f"max error {b.err_abs:.2e} (wrong)"
                for target in ("nodes", "strict", "time", "error", "latency"):
                    out.append(Check(target, label, False, f"bnfuse output unusable: {why}"))
                continue
            names, best_left = _best({t: r.left for t, r in peers.items()})
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
            names, fastest = _best({t: r.fold_ms for t, r in peers.items()})
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
            names, fastest = _best(same_work)
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
            names, best_err = _best({t: r.err_abs for t, r in peers.items()})
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
                        not clearly_slower(
                            lat.vs_original, lat.vs_original_ci, lat.blocks_vs_original
                        ),
                        f"original {orig:.3f} ms, bnfuse {lat.median_ms:.3f} ms "
                        f"(paired {lat.vs_original:.2f}x{_ci(lat.vs_original_ci)})",
                    )
                )
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
        + (f"failed: {r.failed}" if r.failed else f"output wrong ({_err_text(r)})")
        for c in results
        if c.onnx is not None
        for t, r in c.onnx.tools.items()
        if t != "bnfuse" and not r.valid
    ]
    if bad:
        lines += ["", "Peers out of the comparison on a model (failed, or output wrong):", ""]
        lines += [f"- {x}" for x in bad]
    return lines


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _short(text: str, n: int = 60) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def _err_text(r: ToolResult) -> str:
    if r.err_failed:
        return f"does not run: {r.err_failed}"
    return f"max abs error {r.err_abs:.2e}, {r.err_rel:.1e} relative"


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
        best, _ = _best(valid)
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
        _, fastest = _best({t: r.fold_ms for t, r in peers_valid(o).items()})
        ratio = f"**{b.fold_ms / fastest:.2f}**" if fastest and b.fold_ms else "-"
        valid = {t: r.fold_ms for t, r in o.tools.items() if r.valid}
        best, _ = _best(valid)
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
        best, lo = _best(valid)
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
        best, _ = _best(speed)
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
        nl, left = _best({t: r.left for t, r in peers.items()})
        nt, fast = _best({t: r.fold_ms for t, r in peers.items()})
        ne, err = _best({t: r.err_abs for t, r in peers.items()})
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


def _ci(ci: tuple[float, float] | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else ""


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ---------------------------------------------------------------------------------------
# Machine, Markdown, JSON
# ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from bnfuse.bench import machine_info

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **machine_info(),
    }
    for dist in ("onnx", "onnxoptimizer", "onnxslim", "onnxscript", "keras", "tf2onnx"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        info["load average (1/5/15 min) at start"] = load
    info["bnfuse"] = f"{bnfuse.__version__}, {bnfuse_provenance(Path(bnfuse.__file__).parent)}"
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
                    out.append(f"- {t}: output wrong - {_err_text(r)}")
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


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


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
    return _finite(
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


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Models: " + ", ".join(CASES) + ". --quick: " + ", ".join(QUICK) + ".",
    )
    p.add_argument("--quick", action="store_true", help="small subset, fewer reps, shorter timing")
    p.add_argument("--models", help="comma-separated model names (default: all)")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    p.add_argument("--reps", type=int, help="timed fold runs per ONNX tool (default 5, quick 3)")
    p.add_argument(
        "--keras-reps", type=int, help="timed bnfuse runs per .keras model (default 2, quick 1)"
    )
    p.add_argument(
        "--seconds",
        type=float,
        help="latency budget per model and level / Keras pair (default 4, quick 1.5)",
    )
    p.add_argument(
        "--results",
        type=Path,
        help=f"Markdown results file (default {RESULTS_MD.name} on a full run; a --quick or "
        "--models run writes nothing unless given one)",
    )
    p.add_argument(
        "--json", type=Path, help=f"JSON results (default {RESULTS_JSON.name} next to --results)"
    )
    p.add_argument(
        "--summary",
        type=Path,
        help=f"file whose run.py section to rewrite (default {SUMMARY_MD.name} on a full run)",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    p.add_argument("--keep", type=Path, help="keep the prepared models in this directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            mark = "*" if name in QUICK else " "
            print(f"{mark} {name:18s} [{case.group}] {case.doc}")
        print("\n* = in --quick")
        return 0
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            print(f"unknown model(s): {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
    else:
        names = list(QUICK if args.quick else CASES)
    args.reps = args.reps or (3 if args.quick else 5)
    args.keras_reps = args.keras_reps or (1 if args.quick else 2)
    args.seconds = args.seconds or (1.5 if args.quick else 4.0)
    if args.reps < 1 or args.keras_reps < 1 or args.seconds <= 0:
        print("--reps/--keras-reps must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    full = not (args.quick or args.models)
    results_path = args.results or (RESULTS_MD if full else None)
    json_path = args.json or (
        (RESULTS_JSON if full and args.results is None else results_path.with_suffix(".json"))
        if results_path
        else None
    )
    summary_path = args.summary or (SUMMARY_MD if full else None)

    if any(CASES[n].keras for n in names):
        from bnfuse.keras.runtime import configure_threads

        note = configure_threads(1)  # before TensorFlow starts its pools
        if note:
            args.note.append(note)
    info = machine()
    for k, v in info.items():
        log(f"{k}: {v}")
    results: list[CaseResult] = []
    errors: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfuse-run-") as tmp:
        work = Path(tmp)
        warm_up(work)
        for name in names:
            log(f"\n{name} ...")
            case_dir = work / name
            case_dir.mkdir()
            try:
                results.append(bench_case(CASES[name], case_dir, args))
            except Exception as exc:
                traceback.print_exc()
                errors.append(f"{name}: {one_line(exc)}")
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for f in case_dir.glob(f"{name}.*"):
                    shutil.copy2(f, args.keep / f.name)
            shutil.rmtree(case_dir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    log(f"\nall models in {elapsed / 60:.1f} min")

    for title, table in (
        ("BN+affine left", table_nodes(results)),
        ("fold ms", table_time(results)),
        ("max abs error vs float64", table_error(results)),
        ("latency ORT_ENABLE_ALL", table_latency(results, "ORT_ENABLE_ALL")),
        ("latency ORT_DISABLE_ALL", table_latency(results, "ORT_DISABLE_ALL")),
        ("Keras", table_keras(results)),
    ):
        if len(table) > 2:
            print(f"\n{title}\n" + "\n".join(table))
    print("\nVerdict\n" + "\n".join(verdict_lines(results)))
    if errors:
        print("\nerrors:\n" + "\n".join(errors), file=sys.stderr)
    if results:
        args.note.insert(0, f"whole run took {elapsed / 60:.1f} min")
        if results_path is not None:
            results_path.write_text(render_markdown(results, info, args, errors, args.note))
            log(f"\nwrote {results_path}")
        if json_path is not None:
            data = to_json(results, info, args, errors)
            json_path.write_text(json.dumps(data, indent=1) + "\n")
            log(f"wrote {json_path}")
        if summary_path is not None:
            update_summary(summary_path, summary_section(results, info))
            log(f"updated the run.py section of {summary_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
