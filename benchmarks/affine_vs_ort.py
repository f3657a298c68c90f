"""BN in disguise on real Keras 3 exports: bnfuse vs onnxruntime's offline optimizer.

Keras 3's exporter (tf2onnx) writes an inference BatchNormalization as ``Mul`` then ``Add``
by constants. For each model (built in code with ``weights=None``, BN statistics
randomized, exported with ``model.export(path, format="onnx")``) this script

1. counts the BN-equivalent nodes (BatchNormalization, and Mul/Add/Sub/Div by a
   per-channel or scalar constant next to a Conv/ConvTranspose/Gemm/MatMul; a MatMul's
   bias Add is not one) in the export, in bnfuse's output, and in what onnxruntime writes
   with ``optimized_model_filepath`` at ORT_ENABLE_BASIC and ORT_ENABLE_EXTENDED (its
   contrib ops FusedConv/FusedGemm/FusedMatMul count as the layers they replace);
2. times the export, ORT's EXTENDED output and bnfuse's output in onnxruntime
   (ORT_ENABLE_ALL at load, 1 intra-op thread, batch 1), interleaved round-robin with the
   order rotated every round, after warm-up; medians, p90 and the median of paired ratios.

    .venv/bin/python benchmarks/affine_vs_ort.py                 # all models, writes RESULTS-affine.md
    .venv/bin/python benchmarks/affine_vs_ort.py --quick         # small models only, prints only
    .venv/bin/python benchmarks/affine_vs_ort.py --models mobilenet_v2 --seconds 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import bnfuse  # noqa: E402
from bnfuse.onnx.count import count_affine_nodes  # noqa: E402

# isort: split
from _common import git, ort, ort_session, round_robin, session_feeds  # noqa: E402
from _common import ort_offline as offline_optimize  # noqa: E402

SIZE = 96


# ---- models ----------------------------------------------------------------------------


def _keras() -> Any:
    import keras

    return keras


def mobilenet_v2() -> Any:
    k = _keras()
    return k.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3), classes=10)


def efficientnet_b0() -> Any:
    k = _keras()
    return k.applications.EfficientNetB0(weights=None, input_shape=(SIZE, SIZE, 3), classes=10)


def dense_mlp() -> Any:
    k = _keras()
    layers = k.layers
    x = inp = k.Input((256,))
    for width in (512, 512, 256, 256):
        x = layers.Dense(width)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.Dense(10)(x)
    return k.Model(inp, x)


def deconv() -> Any:
    k = _keras()
    layers = k.layers
    x = inp = k.Input((12, 12, 64))
    for filters in (64, 32, 16):
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.Conv2D(3, 3, padding="same")(x)
    return k.Model(inp, x)


def sequence_mlp() -> Any:
    k = _keras()
    layers = k.layers
    x = inp = k.Input((32, 64))  # Dense on a rank-3 input (exported as Reshape/MatMul/Reshape)
    for width in (128, 128, 64):
        x = layers.Dense(width)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    return k.Model(inp, x)


MODELS: dict[str, Callable[[], Any]] = {
    "mobilenet_v2_96": mobilenet_v2,
    "efficientnet_b0_96": efficientnet_b0,
    "dense_bn_mlp": dense_mlp,
    "sequence_dense_bn": sequence_mlp,
    "conv2dtranspose_bn": deconv,
}
QUICK = ("dense_bn_mlp", "sequence_dense_bn", "conv2dtranspose_bn")


def randomize_bn(model: Any, seed: int) -> int:
    """Non-trivial BN statistics (the defaults would fold to the identity)."""
    k = _keras()
    r = np.random.default_rng(seed)
    n = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, k.layers.BatchNormalization):
            continue
        n += 1
        values = []
        for w in layer.weights:
            shape = tuple(w.shape)
            if "variance" in w.path:
                values.append(r.uniform(0.2, 3.0, shape))
            elif "gamma" in w.path:
                values.append(r.uniform(0.5, 2.0, shape) * r.choice([-1, 1], shape))
            else:
                values.append(r.normal(0, 0.5, shape))
        layer.set_weights([v.astype("float32") for v in values])
    return n


def export(name: str, out_dir: Path) -> tuple[Path, int]:
    k = _keras()
    k.utils.set_random_seed(0)
    model = MODELS[name]()
    bns = randomize_bn(model, seed=len(name))
    path = out_dir / f"{name}.onnx"
    spec = [k.InputSpec(shape=(None, *model.inputs[0].shape[1:]), dtype="float32")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False, input_signature=spec)
    return path, bns


# ---- onnxruntime -----------------------------------------------------------------------


def ort_offline(src: Path, dst: Path, level: str) -> float:
    """Seconds onnxruntime's offline optimizer takes at ``level``, file -> file."""
    ort()  # imported and quietened outside the timing
    t0 = time.perf_counter()
    offline_optimize(src, dst, level)
    return time.perf_counter() - t0


_CONTRIB_AS = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul"}


def bn_equivalents(path: Path) -> tuple[int, int, int]:
    """(BatchNormalization nodes, BN-equivalent affine nodes, all nodes)."""
    m = onnx.load(str(path))
    for n in m.graph.node:  # ORT's fused layers are still the layers, for counting
        if n.domain == "com.microsoft" and n.op_type in _CONTRIB_AS:
            n.op_type, n.domain = _CONTRIB_AS[n.op_type], ""
    c = count_affine_nodes(m)
    return c["BatchNormalization"], c["affine"], len(m.graph.node)


def session(path: Path) -> Any:
    return ort_session(path, "ORT_ENABLE_ALL", threads=1)


def max_rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(x)))))
        for x, y in zip(a, b, strict=True)
    )


@dataclass
class Timing:
    median: float
    p90: float
    ratio: float  # median of paired original/variant ratios (>1: faster than the export)
    runs: int


def interleaved(paths: dict[str, Path], seconds: float, warmup: int = 20) -> dict[str, Timing]:
    sessions = {k: session(p) for k, p in paths.items()}
    feeds = session_feeds(next(iter(sessions.values())))
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times = round_robin(sessions, feeds, seconds, min_rounds=30)
    base = np.array(times["export"])
    out = {}
    for k, ts in times.items():
        arr = np.array(ts)
        out[k] = Timing(
            median=float(np.median(arr) * 1e3),
            p90=float(np.percentile(arr, 90) * 1e3),
            ratio=float(np.median(base / arr)),
            runs=len(arr),
        )
    return out


# ---- one model -------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    keras_bns: int
    counts: dict[str, tuple[int, int, int]]  # variant -> (BN, affine, nodes)
    folds: int
    refusals: list[str]
    fold_s: float
    ort_s: float
    diffs: dict[str, float]
    timing: dict[str, Timing]


def run_model(name: str, work: Path, seconds: float) -> Row:
    src, keras_bns = export(name, work)
    fused = work / f"{name}.bnfuse.onnx"
    t0 = time.perf_counter()
    res = bnfuse.fuse(src, fused)
    fold_s = time.perf_counter() - t0
    basic, extended = work / f"{name}.ort_basic.onnx", work / f"{name}.ort_ext.onnx"
    ort_offline(src, basic, "ORT_ENABLE_BASIC")
    ort_s = ort_offline(src, extended, "ORT_ENABLE_EXTENDED")
    variants = {"export": src, "ort_basic": basic, "ort_extended": extended, "bnfuse": fused}
    counts = {k: bn_equivalents(p) for k, p in variants.items()}
    ref_sess = ort().InferenceSession(str(src), providers=["CPUExecutionProvider"])
    feeds = session_feeds(ref_sess, seed=1)
    ref = ref_sess.run(None, feeds)
    diffs = {
        k: max_rel_diff(
            ref,
            ort().InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds),
        )
        for k, p in variants.items()
        if k != "export"
    }
    timing = interleaved({"export": src, "ort_extended": extended, "bnfuse": fused}, seconds)
    return Row(
        name,
        keras_bns,
        counts,
        len(res.folds),
        [f"{r.bn}: {r.reason}" for r in res.refusals],
        fold_s,
        ort_s,
        diffs,
        timing,
    )


# ---- reporting -------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    from bnfuse.bench import machine_info

    info = machine_info()  # CPU model and usable cores, read the same way everywhere
    cpu, usable = info["cpu"], info["usable_cores"]
    commit = git("rev-parse", "--short", "HEAD") or "?"
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable (shared with other jobs)",
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorflow": tf.__version__,
        "keras": _keras().__version__,
        "tf2onnx": tf2onnx.__version__,
        "bnfuse": f"{bnfuse.__version__} (git {commit})",
    }


def count_table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | Keras BNs | export: BN + affine (nodes) | ORT BASIC | ORT EXTENDED | bnfuse | bnfuse folds | refused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cell = {k: f"{bn + aff} ({nodes})" for k, (bn, aff, nodes) in r.counts.items()}
        lines.append(
            f"| {r.name} | {r.keras_bns} | {cell['export']} | {cell['ort_basic']} | "
            f"{cell['ort_extended']} | **{cell['bnfuse']}** | {r.folds} | {len(r.refusals)} |"
        )
    return lines


def latency_table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | export median / p90 ms | ORT EXTENDED median / p90 ms (×) | bnfuse median / p90 ms (×) | bnfuse vs ORT | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, o, b = r.timing["export"], r.timing["ort_extended"], r.timing["bnfuse"]
        lines.append(
            f"| {r.name} | {e.median:.3f} / {e.p90:.3f} | {o.median:.3f} / {o.p90:.3f} "
            f"({o.ratio:.2f}x) | {b.median:.3f} / {b.p90:.3f} ({b.ratio:.2f}x) | "
            f"{o.median / b.median:.2f}x | {e.runs} |"
        )
    return lines


def findings(rows: list[Row]) -> list[str]:
    """One sentence per model, computed from the numbers (no hand-picked wording)."""
    lines = []
    for r in rows:
        left = {k: r.counts[k][0] + r.counts[k][1] for k in r.counts}
        ort = min(left["ort_basic"], left["ort_extended"])
        if left["bnfuse"] < ort:
            verdict = f"bnfuse leaves {left['bnfuse']}, onnxruntime {ort}: bnfuse folds more"
        elif left["bnfuse"] == ort:
            verdict = f"both leave {ort}: a tie (onnxruntime folds these itself)"
        else:
            verdict = f"bnfuse leaves {left['bnfuse']}, onnxruntime {ort}: onnxruntime folds more"
        t = r.timing
        speed = t["ort_extended"].median / t["bnfuse"].median
        if speed >= 1.03:
            lat = f"bnfuse's output is {speed:.2f}x faster than onnxruntime's at ORT_ENABLE_ALL"
        elif speed <= 1 / 1.03:
            lat = f"bnfuse's output is {1 / speed:.2f}x slower than onnxruntime's"
        else:
            lat = "same latency as onnxruntime's output (within 3%)"
        extra = ""
        if r.counts["bnfuse"][2] > r.counts["ort_extended"][2]:
            extra = (
                f"; onnxruntime's EXTENDED graph has fewer nodes overall "
                f"({r.counts['ort_extended'][2]} vs {r.counts['bnfuse'][2]}: activation and "
                "layout fusions bnfuse does not do)"
            )
        lines.append(f"- {r.name}: {verdict}; {lat}{extra}.")
    return lines


def write_results(
    rows: list[Row], info: dict[str, str], path: Path, seconds: float, notes: list[str]
) -> None:
    out = [
        "# BN in disguise (Mul/Add) on Keras 3 exports: bnfuse vs onnxruntime",
        "",
        "Generated by `benchmarks/affine_vs_ort.py` (see its docstring for the method).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Findings",
        "",
        *findings(rows),
        *[f"- {n}" for n in notes],
        "",
        "## BN-equivalent nodes left",
        "",
        "BatchNormalization nodes plus Mul/Add/Sub/Div by a per-channel (or scalar) constant",
        "next to a Conv/ConvTranspose/Gemm/MatMul (a MatMul's bias Add excluded); total node",
        "count in parentheses. ORT columns: the model onnxruntime writes with",
        "`optimized_model_filepath` at that level (FusedConv/FusedGemm/FusedMatMul counted as",
        "the layers they are).",
        "",
        *count_table(rows),
        "",
        "Largest output difference vs the export (onnxruntime, relative to max(1, max|ref|)):",
        "",
        *[f"- {r.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in r.diffs.items()) for r in rows],
        "",
        f"## Latency (onnxruntime ORT_ENABLE_ALL, 1 thread, batch 1, {seconds:g} s interleaved)",
        "",
        "(×) = median of paired export/variant ratios (> 1: faster than the export).",
        "'bnfuse vs ORT' = ORT EXTENDED median / bnfuse median (> 1: bnfuse's output is faster).",
        "",
        *latency_table(rows),
        "",
        "## One-off costs",
        "",
        *[
            f"- {r.name}: bnfuse fuse (load, fold, validate on 8 samples, write) {r.fold_s:.2f} s; "
            f"ORT EXTENDED offline optimize {r.ort_s:.2f} s"
            for r in rows
        ],
    ]
    refusals = [f"- {r.name}: {x}" for r in rows for x in r.refusals]
    if refusals:
        out += ["", "## bnfuse refusals", "", *refusals]
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="", help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="small models only; prints only")
    ap.add_argument("--seconds", type=float, default=15.0, help="interleaved timing per model")
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results file (default RESULTS-affine.md for full runs)",
    )
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep the exported/optimized models here"
    )
    ap.add_argument("--note", action="append", default=[], help="a Findings line (repeatable)")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n] or list(QUICK if args.quick else MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    results = args.results
    if results is None and not args.quick and not args.models:
        results = HERE / "RESULTS-affine.md"
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnfuse-affine-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"{name} ...", flush=True)
            rows.append(run_model(name, work, args.seconds))
    print()
    print("\n".join(count_table(rows)))
    print()
    print("\n".join(latency_table(rows)))
    print()
    print("\n".join(findings(rows)))
    for r in rows:
        for x in r.refusals:
            print(f"refused in {r.name}: {x}")
    if results is not None:
        write_results(rows, info, results, args.seconds, args.note)
        print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
