"""Keras 2 (tf_keras) beside Keras 3: fold time and ``tf.function`` latency (issue 14).

For each architecture the same network is built twice, with ``tf_keras`` (saved as
``.h5``, as a TF 2.x user has it) and with ``keras`` (saved as ``.keras``), with
``weights=None`` and the same randomized BN statistics. For each file:

* fold time: ``bnfuse.fuse(path, out, validate=False)`` in-process, file -> file (load,
  fold, rebuild, write), one untimed warm-up, then the median of ``--reps`` runs;
* latency: bnfuse's own benchmark (``model(x, training=False)`` under ``tf.function``,
  original and fused interleaved, batch 1, 1 thread), median and the median of paired
  original/fused ratios.

    .venv/bin/python benchmarks/keras2.py            # writes benchmarks/RESULTS-keras2.md
    .venv/bin/python benchmarks/keras2.py --quick    # the digits sample and MobileNetV2, prints only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "keras"))

APPS = {"mobilenetv2_96": ("MobileNetV2", 96), "resnet50_96": ("ResNet50", 96)}


def _app(module: Any, cls: str, size: int) -> Any:
    from keras_helpers import randomize

    module.backend.clear_session()
    model = getattr(module.applications, cls)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
    )
    return randomize(model, seed=3, gentle=True)


def _files(name: str, work: Path) -> list[tuple[str, Path]]:
    """(label, path) of the Keras 2 and Keras 3 files of case ``name``."""
    import keras
    import tf_keras

    if name == "digits_mlp_k2":
        return [("Keras 2 .h5", ROOT / "sample_models" / "digits_mlp_k2.h5")]
    cls, size = APPS[name]
    k2, k3 = work / f"{name}.h5", work / f"{name}.keras"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _app(tf_keras, cls, size).save(str(k2), save_format="h5")
        _app(keras, cls, size).save(str(k3))
    return [("Keras 2 .h5", k2), ("Keras 3 .keras", k3)]


def _fold_time(path: Path, out: Path, reps: int) -> tuple[float, int]:
    import bnfuse

    res = bnfuse.fuse(path, out, validate=False)  # warm-up (imports, first traces)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        bnfuse.fuse(path, out, validate=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(res.folds)


def _latency(path: Path, out: Path, seconds: float) -> tuple[float, float, float]:
    import bnfuse

    bench = bnfuse.benchmark(path, out, batches=(1,), threads=1, seconds=seconds)
    row = next(r for r in bench.rows if r.runtime.endswith("tf.function"))
    return row.original.median_ms, row.fused.median_ms, row.speedup


def run(names: list[str], reps: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            for label, path in _files(name, work):
                out = work / f"fused_{path.name}"
                fold_s, folds = _fold_time(path, out, reps)
                before, after, ratio = _latency(path, out, seconds)
                row = {
                    "model": name,
                    "file": label,
                    "folds": folds,
                    "fold_ms": fold_s * 1e3,
                    "orig_ms": before,
                    "fused_ms": after,
                    "speedup": ratio,
                }
                print(
                    f"{name:16s} {label:15s} folds {folds:3d}  fold {row['fold_ms']:8.1f} ms  "
                    f"tf.function b1 {before:7.3f} -> {after:7.3f} ms ({ratio:.2f}x)",
                    flush=True,
                )
                rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], reps: int, seconds: float) -> str:
    import keras
    import tensorflow as tf
    import tf_keras

    lines = [
        "# Keras 2 (tf_keras) beside Keras 3",
        "",
        f"`benchmarks/keras2.py`, tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}, "
        f"keras {keras.__version__}, {os.cpu_count()} CPU(s). Fold time: median of {reps} "
        "in-process `bnfuse.fuse(path, out, validate=False)` runs (load, fold, rebuild, write) "
        "after a warm-up. Latency: bnfuse's benchmark, `model(x, training=False)` under "
        f"`tf.function`, batch 1, 1 thread, {seconds:g} s interleaved; ratio = median of "
        "paired original/fused times (> 1: fused faster).",
        "",
        "| model | file | BN folded | fold time (ms) | original (ms) | fused (ms) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['file']} | {r['folds']} | {r['fold_ms']:.0f} | "
            f"{r['orig_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    names = ["digits_mlp_k2", "mobilenetv2_96"] + ([] if args.quick else ["resnet50_96"])
    seconds = 2.0 if args.quick else args.seconds
    rows = run(names, args.reps, seconds)
    if not args.quick:
        text = render(rows, args.reps, seconds)
        (HERE / "RESULTS-keras2.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
