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
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # fallback when bnfuse is not installed

DEFAULT_RESULTS = HERE / "RESULTS-scale.md"
GB = 1e9  # sizes are reported in decimal GB (10^9 bytes)
TARGET = 2.5  # peak RSS below this multiple of the weights' size
FULL_RUN_BYTES = 2**31  # a run whose weights exceed 2 GiB writes the results file
ALIGN = 64  # byte alignment of tensors in the generated data file (as bnfuse writes)
MODES = ("fold", "validate")


# ---------------------------------------------------------------------------------------
# The generated model
# ---------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    path: Path
    data_path: Path
    weight_bytes: int = 0
    tensors: int = 0
    largest_tensor: int = 0
    nodes: int = 0
    bns: int = 0
    params: int = 0
    layers: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    gen_s: float = 0.0
    header_bytes: int = 0
    data_bytes: int = 0


def plan_dims(target_bytes: float) -> tuple[int, int]:
    """(conv channels C, dense width W) so that the weights total about ``target_bytes``.

    A quarter goes to three C->C 3x3 convolutions, the rest to six WxW dense layers plus
    the C->W and W->1000 ones.
    """
    c = max(64, round(math.sqrt(0.25 * target_bytes / (3 * 9 * 4)) / 64) * 64)
    rest = target_bytes - 4 * (3 * 9 * c * c + 16 * 9 * c)
    # 6 W^2 + (C + 1000) W = rest / 4
    a, b = 6.0, float(c + 1000)
    w = (-b + math.sqrt(b * b + 4 * a * max(rest, 0.0) / 4)) / (2 * a)
    return c, max(64, round(w / 64) * 64)


class _Writer:
    """Appends tensors to the data file and returns TensorProtos that refer to them."""

    def __init__(self, f: Any, location: str, info: ModelInfo):
        self.f, self.location, self.info = f, location, info

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        pad = -self.f.tell() % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(arr.data)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", arr.nbytes)):
            e = t.external_data.add()
            e.key, e.value = key, str(value)
        self.info.weight_bytes += arr.nbytes
        self.info.tensors += 1
        self.info.params += arr.size
        self.info.largest_tensor = max(self.info.largest_tensor, arr.nbytes)
        return t


def generate(path: Path, target_bytes: float, seed: int = 0) -> ModelInfo:
    """Write the benchmark model to ``path`` + ``<name>.data``; one weight in memory at a time.

    Conv(16->C, 3x3) -> BN -> Relu, Conv(C->C, 3x3, bias) -> BN -> Relu x3 at 4x4, global
    average pool, Flatten, Gemm(C->W, transB) -> BN -> Relu, then six W->W layers alternating
    MatMul -> Add -> BN -> Relu and Gemm(transB) -> BN -> Relu, and Gemm(W->1000) -> BN.
    He-initialized weights, BN statistics far from identity; every BN can be folded.
    """
    t0 = time.perf_counter()
    c, w = plan_dims(target_bytes)
    data_path = path.with_name(path.name + ".data")
    info = ModelInfo(path, data_path, input_shape=(2, 16, 4, 4))
    r = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def weight(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        arr = r.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(math.sqrt(2.0 / fan_in))
        return arr

    with open(data_path, "wb") as f:
        wr = _Writer(f, data_path.name, info)

        def add(name: str, arr: np.ndarray) -> str:
            inits.append(wr.tensor(name, arr))
            return name

        def bn(x: str, n: int, name: str) -> str:
            scale = add(f"{name}.scale", r.uniform(0.5, 1.5, n))
            bias = add(f"{name}.bias", r.normal(0, 0.1, n))
            mean = add(f"{name}.mean", r.normal(0, 0.1, n))
            var = add(f"{name}.var", r.uniform(0.5, 1.5, n))
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [x, scale, bias, mean, var],
                    [f"{name}.y"],
                    name=name,
                    epsilon=1e-5,
                )
            )
            info.bns += 1
            return f"{name}.y"

        def relu(x: str, name: str) -> str:
            nodes.append(helper.make_node("Relu", [x], [f"{name}.y"], name=name))
            return f"{name}.y"

        x = "x"
        cin = info.input_shape[1]
        for i in range(4):
            name = f"conv{i}"
            ins = [x, add(f"{name}.w", weight((c, cin, 3, 3), cin * 9))]
            if i > 0:
                ins.append(add(f"{name}.b", r.normal(0, 0.1, c)))
            nodes.append(helper.make_node("Conv", ins, [f"{name}.y"], name=name, pads=[1, 1, 1, 1]))
            info.layers.append(f"Conv {cin}->{c} 3x3{' +bias' if i else ''} -> BN -> Relu")
            x = relu(bn(f"{name}.y", c, f"{name}.bn"), f"{name}.relu")
            cin = c
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap.y"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gap.y"], ["flat.y"], name="flat"))
        info.layers.append("GlobalAveragePool -> Flatten")
        x, k = "flat.y", c
        dense = [("gemm", w)] + [("matmul" if i % 2 == 0 else "gemm", w) for i in range(6)]
        dense.append(("gemm", 1000))
        for i, (kind, n) in enumerate(dense):
            name = f"fc{i}"
            last = i == len(dense) - 1
            if kind == "gemm":
                wt = add(f"{name}.w", weight((n, k), k))
                b = add(f"{name}.b", r.normal(0, 0.1, n))
                nodes.append(
                    helper.make_node("Gemm", [x, wt, b], [f"{name}.y"], name=name, transB=1)
                )
                desc = f"Gemm(transB=1) {k}->{n} +bias"
                y = f"{name}.y"
            else:
                wt = add(f"{name}.w", weight((k, n), k))
                b = add(f"{name}.b", r.normal(0, 0.1, n))
                nodes.append(helper.make_node("MatMul", [x, wt], [f"{name}.mm"], name=name))
                nodes.append(
                    helper.make_node("Add", [f"{name}.mm", b], [f"{name}.y"], name=f"{name}.add")
                )
                desc = f"MatMul {k}->{n} -> Add"
                y = f"{name}.y"
            x = bn(y, n, f"{name}.bn")
            if not last:
                x = relu(x, f"{name}.relu")
            info.layers.append(desc + " -> BN" + ("" if last else " -> Relu"))
            k = n
        f.flush()
        os.fsync(f.fileno())

    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *info.input_shape[1:]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.producer_name = "bnfuse benchmarks/scale.py"
    info.nodes = len(nodes)
    path.write_bytes(model.SerializeToString())  # the header: weights are all external
    info.header_bytes, info.data_bytes = path.stat().st_size, data_path.stat().st_size
    info.gen_s = time.perf_counter() - t0
    return info


# ---------------------------------------------------------------------------------------
# Memory: /proc/<pid>/status
# ---------------------------------------------------------------------------------------

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes ({} once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples a child's RSS from outside (no GIL of the child's to wait for)."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int, int]] = []  # (time, rss, anon, file)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            st = proc_status(self.pid)
            if st:
                self.samples.append(
                    (time.time(), st["VmRSS"], st.get("RssAnon", 0), st.get("RssFile", 0))
                )
            self.stop.wait(self.interval)


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

    from bnfuse.onnx import external

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


@dataclass
class Run:
    mode: str
    report: dict[str, Any]
    samples: list[tuple[float, int, int, int]]
    wall_s: float
    wait4_maxrss: int
    returncode: int

    @property
    def phases(self) -> list[dict[str, Any]]:
        return list(self.report.get("phases", []))

    @property
    def peak(self) -> int:
        """Peak RSS of the whole process: the largest per-phase VmHWM (equals ru_maxrss of
        a run without resets), or the sampled maximum if that is larger."""
        return max([p["peak"] for p in self.phases] + [self.sampled_max])

    @property
    def sampled_max(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    def sampled_in(self, start: float, end: float) -> tuple[int, int, int]:
        """(rss, anon, file) of the largest sample taken in [start, end]."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        best = max(inside, key=lambda s: s[1], default=(0.0, 0, 0, 0))
        return best[1], best[2], best[3]


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


# ---------------------------------------------------------------------------------------
# Machine, resources, report
# ---------------------------------------------------------------------------------------


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def machine() -> dict[str, str]:
    from fold_speed import machine_info

    info = machine_info()
    try:
        total = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        info["memory"] = f"{total / GB:.1f} GB total, {mem_available() / GB:.1f} GB available"
    except (OSError, StopIteration, ValueError):
        pass
    from google.protobuf.internal import api_implementation

    info["protobuf"] = f"{_version('protobuf')} ({api_implementation.Type()} implementation)"
    return info


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def x(n: float, weights: int) -> str:
    return f"{n / weights:.2f}x"


def phase_rows(run: Run, weights: int, base: int) -> list[str]:
    lines = [
        "| phase | wall s | peak RSS in phase GB | x weights | copies of the weights above "
        "baseline | RSS at end GB (anon / file) | largest sample GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in run.phases:
        if p["phase"] == "import":
            continue
        s, _, _ = run.sampled_in(p["start"], p["end"])
        lines.append(
            f"| {p['phase']} | {p['end'] - p['start']:.1f} | {gb(p['peak'])} "
            f"| {x(p['peak'], weights)} | {(p['peak'] - base) / weights:.2f} "
            f"| {gb(p['rss_end'])} ({gb(p['anon_end'])} / {gb(p['file_end'])}) "
            f"| {gb(s) if s else '-'} |"
        )
    return lines


PHASE_DOC = {
    "load": "read the header, check locations, map the data file read-only: every weight "
    "is a placeholder for a span of the map, nothing is read (+ stats)",
    "fold": "shape inference on the (light) model, then the folds: weights read as views of "
    "the map, folded weights kept as products computed while they are written; in the "
    "loaded model itself when nothing needs the original (`fold` mode), else in a copy "
    "of its skeleton",
    "ort_original": "onnxruntime session of the original, from its file path (bnfuse first "
    "lets go of the mapped pages it touched)",
    "ort_fused": "fused model streamed to a temporary header + data file, onnxruntime "
    "session from that path (it maps the data)",
    "compare": "validation runs on both sessions",
    "bisect": "bisection of failing folds",
    "save": "atomic write of header + .data beside it, weights streamed from the map and "
    "computed block by block (+ stats)",
}


def render(
    info: ModelInfo,
    runs: dict[str, Run],
    check: dict[str, Any] | None,
    mach: dict[str, str],
    args: argparse.Namespace,
    errors: list[str],
    findings: list[str],
) -> str:
    w = info.weight_bytes
    base = runs["baseline"].peak if "baseline" in runs else 0
    lines = [
        "# bnfuse on a model above 2 GB: peak memory and correctness",
        "",
        "Generated by `benchmarks/scale.py` (see `benchmarks/README.md`). Do not edit by hand;",
        "rerun the script.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in mach.items()],
        "",
        "## Model",
        "",
        f"- generated in code (seed {args.seed}) in {info.gen_s:.1f} s, written tensor by tensor "
        f"as a {info.header_bytes} byte header + a {info.data_bytes} byte data file (relative location, "
        f"{ALIGN}-byte aligned tensors)",
        f"- weights: **{gb(w)} GB** ({w} bytes, {info.params / 1e6:.0f}M float32 parameters in "
        f"{info.tensors} tensors, largest {info.largest_tensor / 1e6:.0f} MB); "
        f"2 GiB = {gb(2**31)} GB",
        f"- {info.nodes} nodes, {info.bns} BatchNormalization; input x: "
        f"[N, {', '.join(map(str, info.input_shape[1:]))}], batch {info.input_shape[0]} "
        "in the checks",
        *[f"  - {layer}" for layer in info.layers],
        "",
        "## Method",
        "",
        "- Each mode runs in a fresh `python` subprocess that imports bnfuse, onnx and "
        "onnxruntime first. The parent samples the child's `/proc/<pid>/status` VmRSS every "
        f"{args.interval * 1000:.0f} ms; the child reads its own VmHWM (exact peak RSS) at "
        "every phase boundary (bnfuse's progress callback, plus a hook on the backend's "
        "`runner` that names the validation steps) and resets it (`/proc/self/clear_refs`), "
        "so every phase has its own exact peak. The process peak is the largest phase peak "
        "(what `ru_maxrss` reports without resets).",
        "- `baseline`: the process after the imports only. *Net* = peak minus that baseline.",
        "- `fold`: `bnfuse.fuse(src, out, validate=False)` (the CLI's `--no-validate`).",
        f"- `validate`: `bnfuse.fuse(src, out, validate=True, samples={args.samples})` "
        "(the default). It holds both protos and two onnxruntime sessions; its peak is "
        "reported separately against the same target.",
        "- Correctness (another subprocess, after the measured runs): the output header and "
        "`<name>.data` beside it, relative location, `onnx.checker.check_model(path)`, "
        "`onnx.load` with its external data, no BatchNormalization left, and onnxruntime "
        "(CPU, `ORT_DISABLE_ALL`, sessions built from the file paths) on one random batch "
        "against the original.",
        "",
        "## Peak memory",
        "",
        f"Target: peak RSS < {TARGET}x the weights ({gb(TARGET * w)} GB).",
        "",
        "| mode | wall s | peak RSS GB | x weights | net of baseline GB | net x weights "
        "| largest sample GB | target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, run in runs.items():
        peak = run.peak
        wall = run.report.get("wall_s", run.wall_s)
        met = "-" if mode == "baseline" else ("**yes**" if peak < TARGET * w else "**NO**")
        lines.append(
            f"| {mode} | {wall:.1f} | {gb(peak)} | {x(peak, w)} | "
            f"{gb(peak - base) if mode != 'baseline' else '-'} | "
            f"{x(peak - base, w) if mode != 'baseline' else '-'} | {gb(run.sampled_max)} | {met} |"
        )
    lines += [
        "",
        "Wall s: the `bnfuse.fuse` call (baseline: the whole process, imports included).",
        "",
        "## Verdict",
        "",
    ]
    for mode in MODES:
        if mode in runs:
            peak = runs[mode].peak
            ok = peak < TARGET * w
            lines.append(
                f"- `{mode}`: peak {gb(peak)} GB = {x(peak, w)} the weights "
                f"({x(peak - base, w)} net of the {gb(base)} GB baseline): target "
                f'"peak < {TARGET}x weights" {"met" if ok else "**missed**"}.'
            )
    if check is not None:
        bad = [o for o, r in check["outputs"].items() if r["problems"]]
        lines.append(
            "- Correctness: "
            + (
                "every output passed every check."
                if not bad
                else "**failed** for " + ", ".join(Path(b).name for b in bad) + "."
            )
        )
    lines += ["", "## Phases", ""]
    for mode in MODES:
        if mode in runs:
            lines += [f"### `{mode}`", "", *phase_rows(runs[mode], w, base), ""]
    lines += [
        "Copies above baseline = (phase peak - baseline) / weights. RSS anon / file: "
        "anonymous memory vs file pages mapped into the process.",
        "",
        *[f"- `{k}`: {v}" for k, v in PHASE_DOC.items()],
        "",
    ]
    if check is not None:
        lines += [
            "## Correctness",
            "",
            "| output | files | location | header bytes | BNs left | nodes | onnx.checker "
            "| max abs err | max abs err / max(1, max abs ref) | max rel err | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for out, r in check["outputs"].items():
            lines.append(
                f"| {Path(out).name} | {', '.join(r['files'])} | {', '.join(r['locations'])} "
                f"| {r['header_bytes']} | {r['bns']} | {r['nodes']} | {r['checker']} "
                f"| {r['max_abs']:.2e} | {r['scaled']:.2e} | {r['max_rel']:.2e} "
                f"| {'yes' if not r['problems'] else 'NO: ' + '; '.join(r['problems'])} |"
            )
        lines += [
            "",
            f"Original model: {info.nodes} nodes, {info.bns} BNs; max |ref| = "
            f"{next(iter(check['outputs'].values()))['max_ref']:.3g}. Max rel err is over "
            "elements with |ref| > 1e-3 max |ref|.",
            "",
        ]
    if findings:
        lines += ["## Where the memory goes", "", *findings, ""]
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    if args.note:
        lines += ["## Notes", "", *[f"- {n}" for n in args.note], ""]
    return "\n".join(lines)


def findings_for(runs: dict[str, Run], w: int, largest: int) -> list[str]:
    """Plain statements about which phase holds the peak and how many weight copies."""
    base = runs["baseline"].peak if "baseline" in runs else 0
    out = []
    for mode in MODES:
        if mode not in runs or not runs[mode].phases:
            continue
        phases = [p for p in runs[mode].phases if p["phase"] != "import"]
        top = max(phases, key=lambda p: p["peak"])
        copies = (top["peak"] - base) / w
        out.append(
            f"- `{mode}`: the peak is in `{top['phase']}`: {gb(top['peak'])} GB, "
            f"{copies:.2f} copies of the weights above the baseline "
            f"(the largest single tensor is {largest / w:.2f} of the weights)."
        )
        for p in phases:
            out.append(
                f"  - `{p['phase']}`: peak {(p['peak'] - base) / w:.2f} copies, "
                f"{(p['rss_end'] - base) / w:.2f} at its end"
            )
    return out


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
        errors.append(
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        )
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
