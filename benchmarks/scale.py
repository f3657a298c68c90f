"""Fold a generated ONNX model above 2 GB (external data) and record bnfuse's peak memory.

Issue: "a generated ONNX model over 2 GB with external data folds correctly; peak memory
recorded (target: under 2.5x the weights' size)". In one run:

1. Generate a seeded model (Conv -> BN -> Relu, then Gemm / MatMul+Add -> BN -> Relu, large
   float32 weights, ``--size-gb`` of them) straight into a header + one data file, tensor
   by tensor, so the generator itself never holds more than one weight.
2. Measure, each in a fresh subprocess whose RSS is sampled by this process and whose
   peak RSS (``VmHWM``) is read inside it at every phase boundary:

   * ``baseline``: a Python that only imported bnfuse, onnx and onnxruntime;
   * ``fold``:     ``bnfuse.fuse(src, out, validate=False)`` (what ``bnfuse --no-validate``
     does);
   * ``validate``: ``bnfuse.fuse(src, out, validate=True, samples=2)`` (the default path:
     onnxruntime sessions of the original and the fused model on top of both protos).

3. Check the outputs in another subprocess: ``.data`` beside the header under a relative
   location, loads with ``onnx``, passes ``onnx.checker``, no BatchNormalization left, and
   onnxruntime (CPU, optimizations disabled, from the file paths) gives the original's
   outputs on a random input.

    .venv/bin/python benchmarks/scale.py                   # ~2.25 GB, writes RESULTS-scale.md
    .venv/bin/python benchmarks/scale.py --size-gb 0.3     # quick check, prints only

Missing the memory target is reported, not an error; the exit status is 1 only when a
step crashed or a correctness check failed, 2 for bad arguments or too little disk/RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # fallback when bnfuse is not installed

from _common import one_line  # noqa: E402
from scaling.memory import Run, Sampler, mem_available, proc_status, reset_peak  # noqa: E402
from scaling.model import ModelInfo, generate  # noqa: E402
from scaling.report import GB, MODES, findings_for, gb, machine, render, x  # noqa: E402

DEFAULT_RESULTS = HERE / "RESULTS-scale.md"
FULL_RUN_BYTES = 2**31  # a run whose weights exceed 2 GiB writes the results file


# ---------------------------------------------------------------------------------------
# The measured child process
# ---------------------------------------------------------------------------------------

PHASE_NAMES = {
    "loading model": "load",
    "folding": "fold",
    "validating": None,  # the runner hook below names the validation steps
    "bisecting folds": "bisect",
    "writing": "save",
}


class Phases:
    """Phase boundaries with the process's peak RSS inside each phase (VmHWM, reset at
    every boundary) and its RSS at the end of it."""

    def __init__(self, reset: bool):
        self.reset = reset
        self.rows: list[dict[str, Any]] = []
        self.current = "import"
        self.start = time.time()

    def mark(self, name: str) -> None:
        now, st = time.time(), proc_status()
        self.rows.append(
            {
                "phase": self.current,
                "start": self.start,
                "end": now,
                "peak": st.get("VmHWM", 0),
                "rss_end": st.get("VmRSS", 0),
                "anon_end": st.get("RssAnon", 0),
                "file_end": st.get("RssFile", 0),
            }
        )
        if self.reset:
            self.reset = reset_peak()
        self.current, self.start = name, time.time()


def child_main(args: argparse.Namespace) -> int:
    t_start = time.time()
    import onnxruntime  # noqa: F401 - part of the baseline every mode pays for

    import bnfuse
    import bnfuse.api
    from bnfuse.onnx import backend as onnx_backend

    phases = Phases(reset=not args.no_reset)
    phases.start = t_start
    report: dict[str, Any] = {"mode": args.child, "pid": os.getpid()}
    if args.child != "baseline":
        phases.mark("start")
        original_runner = onnx_backend.OnnxBackend.runner
        calls = 0

        def runner(self: Any, model: Any) -> Any:  # names the validation steps
            nonlocal calls
            calls += 1
            phases.mark("ort_original" if calls == 1 else "ort_fused")
            r = original_runner(self, model)
            if calls > 1:
                phases.mark("compare")
            return r

        onnx_backend.OnnxBackend.runner = runner  # type: ignore[method-assign]

        def progress(what: str, done: float, total: float | None) -> None:
            name = PHASE_NAMES.get(what, what)
            if name is not None and name != phases.current:
                phases.mark(name)

        t0 = time.perf_counter()
        res = bnfuse.fuse(
            args.src,
            args.out,
            validate=args.child == "validate",
            samples=args.samples,
            progress=progress,
        )
        report["wall_s"] = time.perf_counter() - t0
        phases.mark("end")
        report["folds"] = len(res.folds)
        report["refusals"] = [f"{r.bn}: {r.reason}" for r in res.refusals]
        report["written"] = res.written
        report["warnings"] = list(res.warnings)
        if res.validation is not None:
            v = res.validation
            report["validation"] = {
                "passed": v.passed,
                "samples": v.samples,
                "max_abs": max((o.max_abs_error for o in v.outputs), default=float("nan")),
                "max_rel": max((o.max_rel_error for o in v.outputs), default=float("nan")),
            }
    else:
        phases.mark("end")
    import resource

    report["phases"] = [r for r in phases.rows if r["phase"] != "start"]
    report["hwm_reset"] = phases.reset
    report["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["import_s"] = phases.rows[0]["end"] - t_start
    Path(args.report).write_text(json.dumps(report))
    return 0


def check_main(args: argparse.Namespace) -> int:
    """Correctness of the written outputs (separate process: not part of bnfuse's memory)."""
    import onnxruntime as ort

    from bnfuse.onnx.storage import external

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = Path(args.src)
    header = onnx.load(str(src), load_external_data=False)
    shape = [d.dim_value or 2 for d in header.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0].astype(np.float64)
    del sess
    report: dict[str, Any] = {"ref_s": time.perf_counter() - t0, "outputs": {}}
    for out in args.outs:
        path = Path(out)
        row: dict[str, Any] = {"problems": []}
        problems = row["problems"]
        t0 = time.perf_counter()
        header = onnx.load(str(path), load_external_data=False)
        locations = external.external_locations(header)
        row["locations"] = locations
        if locations != [f"{path.name}.data"]:
            problems.append(f"external locations {locations}, expected [{path.name}.data]")
        for loc in locations:
            if os.path.isabs(loc) or "/" in loc or "\\" in loc:
                problems.append(f"location {loc!r} is not a plain relative name")
            if not (path.parent / loc).is_file():
                problems.append(f"{loc} is not beside {path.name}")
        row["files"] = sorted(p.name for p in path.parent.glob(f"{path.name}*"))
        row["header_bytes"] = path.stat().st_size
        row["data_bytes"] = sum((path.parent / loc).stat().st_size for loc in locations)
        row["bns"] = sum(
            n.op_type == "BatchNormalization"
            for g in [header.graph]
            for n in g.node  # the generated model has no subgraphs or functions
        )
        row["nodes"] = len(header.graph.node)
        if row["bns"]:
            problems.append(f"{row['bns']} BatchNormalization node(s) left")
        try:
            onnx.checker.check_model(str(path))
            row["checker"] = "ok"
        except Exception as exc:
            row["checker"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            problems.append("onnx.checker: " + row["checker"])
        full = onnx.load(str(path))  # every weight read back through onnx's own loader
        row["loaded_tensors"] = len(full.graph.initializer)
        del full
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x})[0].astype(np.float64)
        del sess
        diff = np.abs(got - ref)
        row["max_abs"] = float(diff.max())
        row["max_ref"] = float(np.abs(ref).max())
        row["scaled"] = row["max_abs"] / max(1.0, row["max_ref"])
        big = np.abs(ref) > 1e-3 * row["max_ref"]
        row["max_rel"] = float((diff[big] / np.abs(ref[big])).max()) if big.any() else 0.0
        if not row["scaled"] < 1e-4:
            problems.append(f"outputs differ: max abs {row['max_abs']:.3g}")
        row["check_s"] = time.perf_counter() - t0
        report["outputs"][out] = row
    import resource

    report["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.report).write_text(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------
# The parent: launch, sample, collect
# ---------------------------------------------------------------------------------------


def run_child(argv: list[str], mode: str, interval: float, work: Path) -> Run:
    report_path = work / f"report-{mode}.json"
    report_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--report", str(report_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    sampler = Sampler(proc.pid, interval)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: do not leave a multi-GB child running
        proc.kill()
        proc.wait()
        sampler.stop.set()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return Run(mode, report, sampler.samples, wall, usage.ru_maxrss * 1024, proc.returncode)


def check_resources(work: Path, weights: float, modes: list[str]) -> str | None:
    """A reason the run cannot go ahead (disk or memory), or None."""
    need_disk = weights * (1 + len(modes)) + 0.5 * GB  # source + one output per mode
    tmp = Path(tempfile.gettempdir())
    free = shutil.disk_usage(work).free
    if "validate" in modes and os.stat(tmp).st_dev != os.stat(work).st_dev:
        if shutil.disk_usage(tmp).free < weights * 1.1:
            return (
                f"{tmp}: {gb(shutil.disk_usage(tmp).free)} GB free, validation writes a "
                f"{gb(weights)} GB temporary copy of the fused model there (set TMPDIR)"
            )
    elif "validate" in modes:
        need_disk += weights
    if free < need_disk:
        return (
            f"{work}: {gb(free)} GB free on disk, this run needs about {gb(need_disk)} GB "
            "(use --workdir on a larger disk or a smaller --size-gb)"
        )
    need_ram = weights * (4.5 if "validate" in modes else 2.5) + 0.5 * GB
    avail = mem_available()
    if avail and avail < need_ram:
        return (
            f"{gb(avail)} GB of RAM available, this run may need about {gb(need_ram)} GB "
            f"({'validate mode holds ~4x the weights' if 'validate' in modes else ''}); "
            "use a smaller --size-gb or --modes fold"
        )
    return None


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--size-gb", type=float, default=2.25, help="weights to generate, GB (default 2.25)"
    )
    p.add_argument("--modes", default=",".join(MODES), help="fold,validate (default both)")
    p.add_argument("--samples", type=int, default=2, help="validation samples (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where to write the models (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated and fused models")
    p.add_argument(
        "--results",
        type=Path,
        help=f"Markdown results file (default: {DEFAULT_RESULTS.name} when the weights exceed "
        "2 GiB; smaller runs print only unless given one)",
    )
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling period, s")
    p.add_argument(
        "--no-reset",
        action="store_true",
        help="do not reset VmHWM between phases (then each phase reports the running peak)",
    )
    p.add_argument(
        "--note", action="append", default=[], help="a line for the results file's Notes"
    )
    # internal: the measured and checking subprocesses
    p.add_argument("--child", choices=("baseline", *MODES), help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--outs", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.check:
        return check_main(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        print(f"--modes: choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.size_gb <= 0 or args.samples < 1 or args.interval <= 0:
        print("--size-gb, --samples and --interval must be positive", file=sys.stderr)
        return 2
    target = args.size_gb * GB

    mach = machine()
    for key, value in mach.items():
        print(f"{key}: {value}")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="bnfuse-scale-", dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="bnfuse-scale-"))
    reason = check_resources(work, target, modes)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 2

    errors: list[str] = []
    runs: dict[str, Run] = {}
    check: dict[str, Any] | None = None
    info: ModelInfo | None = None
    findings: list[str] = []
    try:
        print(f"\nworkdir {work}\ngenerating ~{args.size_gb:g} GB of weights ...", flush=True)
        (work / "src").mkdir()
        info = generate(work / "src" / "model.onnx", target, args.seed)
        w = info.weight_bytes
        print(
            f"  {gb(w)} GB in {info.tensors} tensors (largest {info.largest_tensor / 1e6:.0f} "
            f"MB), {info.nodes} nodes, {info.bns} BNs, {info.gen_s:.1f} s",
            flush=True,
        )
        common = ["--samples", str(args.samples)] + (["--no-reset"] if args.no_reset else [])
        runs["baseline"] = run_child(["--child", "baseline", *common], "baseline", 0.01, work)
        print(f"baseline: {gb(runs['baseline'].peak)} GB", flush=True)
        outs = []
        for mode in modes:
            out_dir = work / mode
            out_dir.mkdir()
            out = out_dir / f"{mode}.onnx"
            print(f"{mode} ...", flush=True)
            argv_ = ["--child", mode, "--src", str(info.path), "--out", str(out), *common]
            run = run_child(argv_, mode, args.interval, work)
            if run.returncode != 0 or not run.report:
                errors.append(f"{mode}: the bnfuse subprocess failed (exit {run.returncode})")
                continue
            runs[mode] = run
            outs.append(str(out))
            v = run.report.get("validation")
            print(
                f"  {run.report['wall_s']:.1f} s, peak {gb(run.peak)} GB = {x(run.peak, w)} "
                f"weights (sampled max {gb(run.sampled_max)}"
                + (f", wait4 ru_maxrss {gb(run.wait4_maxrss)}" if args.no_reset else "")
                + f"), {run.report['folds']} folds"
                + (f", validation passed={v['passed']}" if v else ""),
                flush=True,
            )
            for p in run.phases:
                print(
                    f"    {p['phase']:13s} {p['end'] - p['start']:7.1f} s  peak {gb(p['peak'])} "
                    f"GB  end {gb(p['rss_end'])} GB",
                    flush=True,
                )
            if run.report["refusals"]:
                errors.append(f"{mode}: bnfuse refused " + "; ".join(run.report["refusals"]))
            if v and not v["passed"]:
                errors.append(f"{mode}: bnfuse's validation failed ({v})")
        if outs:
            print("checking outputs ...", flush=True)
            r = run_child(["--check", "--src", str(info.path), "--outs", *outs], "check", 0.5, work)
            if r.returncode != 0 or not r.report:
                errors.append(f"correctness check crashed (exit {r.returncode})")
            else:
                check = r.report
                for out, row in check["outputs"].items():
                    print(
                        f"  {Path(out).name}: BNs left {row['bns']}, max abs {row['max_abs']:.2e}"
                        f", scaled {row['scaled']:.2e}, problems: {row['problems'] or 'none'}"
                    )
                    errors += [f"{Path(out).name}: {p}" for p in row["problems"]]
        findings = findings_for(runs, w, info.largest_tensor)
    except Exception as exc:
        traceback.print_exc()
        errors.append(one_line(exc))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if info is None:
        return 1
    print("\n" + "\n".join(findings))
    results = args.results or (DEFAULT_RESULTS if info.weight_bytes > FULL_RUN_BYTES else None)
    if results is not None:
        text = render(info, runs, check, mach, args, errors, findings)
        results.write_text(text)
        print(f"\nwrote {results}")
    if errors:
        print("\nerrors:\n" + "\n".join(errors), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
