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

This file is the command line; the cases, measurement, verdicts and rendering live in the
``compare`` package beside it, the helpers shared with the other scripts in ``_common``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # fallback when bnfuse is not installed

# bnfuse first: affine_vs_ort puts the checkout first on sys.path, and a PYTHONPATH
# snapshot of bnfuse (see benchmarks/README.md) must win over it.
import bnfuse  # noqa: E402, F401

# isort: split
from _common import log, one_line  # noqa: E402
from compare.cases import CASES, QUICK  # noqa: E402
from compare.measure import bench_case, warm_up  # noqa: E402
from compare.render import (  # noqa: E402
    machine,
    render_markdown,
    summary_section,
    table_error,
    table_keras,
    table_latency,
    table_nodes,
    table_time,
    to_json,
    update_summary,
)
from compare.results import CaseResult  # noqa: E402
from compare.verdicts import verdict_lines  # noqa: E402

RESULTS_MD = HERE / "RESULTS-compare.md"
RESULTS_JSON = HERE / "RESULTS.json"
SUMMARY_MD = HERE / "RESULTS.md"


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
