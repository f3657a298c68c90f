"""Whole-process start-up: ``bnfuse M -o F --no-validate`` against a fresh Python process
running onnxruntime's offline optimizer on the same file (issue 15).

A user waits for the whole process, imports included. Measured side by side, alternating
(bnfuse, onnxruntime, bnfuse, ...), medians of ``--reps`` runs after one warm-up each:

* per model: ``python -m bnfuse M -o F --no-validate -q`` vs ``python -c <ORT>`` where the
  script creates an ``InferenceSession`` at ``ORT_ENABLE_BASIC`` with
  ``optimized_model_filepath`` (its Conv+BN fusion lives at BASIC), as in ``_peers.py``;
* the four models in one ``bnfuse M1 M2 M3 M4 -o DIR`` vs one Python process running the
  optimizer over the four files;
* ``bnfuse --help``, and ``python -c pass`` as the floor of any Python process;
* the import breakdown of one run (``python -X importtime``), by top-level package.

Both sides run with their bytecode cached (``PYTHONDONTWRITEBYTECODE`` is dropped for the
children, and the warm-up writes bnfuse's ``__pycache__``), as after ``pip install``.

The models are torchvision-style exports built in code (no downloads): MobileNetV2,
EfficientNet-B0, DenseNet121 and ResNet50 at 224x224 with their 1000-class heads, random
weights and non-identity BN statistics, BN nodes kept as a training-mode export keeps them.

    .venv/bin/python benchmarks/startup.py               # writes RESULTS-startup.md
    .venv/bin/python benchmarks/startup.py --reps 3 --models mobilenet_v2 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from models import Builder  # noqa: E402

RESULTS = HERE / "RESULTS-startup.md"

ORT_SCRIPT = """
import sys
import onnxruntime as ort
ort.set_default_logger_severity(3)
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = dst
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
"""

# ---------------------------------------------------------------------------------------
# torchvision-style models (eval-mode architecture; BN nodes kept)
# ---------------------------------------------------------------------------------------


def _act(b: Builder, x: str, kind: str) -> str:
    if kind == "relu":
        return b.relu(x)
    if kind == "relu6":  # torch exports ReLU6 as Clip(0, 6)
        lo = b.const(np.array(0.0, np.float32), "clip_min")
        hi = b.const(np.array(6.0, np.float32), "clip_max")
        return b.node("Clip", [x, lo, hi])
    return b.node("Mul", [x, b.node("Sigmoid", [x])])  # SiLU as torch exports it


def _cba(b: Builder, x: str, cin: int, cout: int, k: int, s: int, act: str, g: int = 1) -> str:
    y = b.bn(b.conv(x, cin, cout, k, s, group=g), cout)
    return _act(b, y, act) if act else y


def _head(b: Builder, x: str, c: int, classes: int = 1000) -> None:
    y = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    w = b.weight([classes, c], c, "fc_W")
    b.output(b.node("Gemm", [y, w, b.bias(classes, "fc_b")], "fc", transB=1))


def mobilenet_v2() -> onnx.ModelProto:
    """torchvision mobilenet_v2: inverted residuals, ReLU6, 52 BNs, 3.5M parameters."""
    b = Builder("mobilenet_v2", seed=21)
    y = _cba(b, b.input("input", ["N", 3, 224, 224]), 3, 32, 3, 2, "relu6")
    c = 32
    for t, cout, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
        for i in range(n):
            stride = s if i == 0 else 1
            hid = c * t
            z = _cba(b, y, c, hid, 1, 1, "relu6") if t != 1 else y
            z = _cba(b, z, hid, hid, 3, stride, "relu6", g=hid)
            z = _cba(b, z, hid, cout, 1, 1, "")
            y = b.node("Add", [y, z]) if stride == 1 and c == cout else z
            c = cout
    _head(b, _cba(b, y, c, 1280, 1, 1, "relu6"), 1280)
    return b.model()


def efficientnet_b0() -> onnx.ModelProto:
    """torchvision efficientnet_b0: MBConv with squeeze-excitation, SiLU, 49 BNs, 5.3M."""
    b = Builder("efficientnet_b0", seed=22)
    y = _cba(b, b.input("input", ["N", 3, 224, 224]), 3, 32, 3, 2, "silu")
    c = 32
    for t, k, s, cout, n in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
                             (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
                             (6, 3, 1, 320, 1)):  # fmt: skip
        for i in range(n):
            stride = s if i == 0 else 1
            hid = c * t
            z = _cba(b, y, c, hid, 1, 1, "silu") if t != 1 else y
            z = _cba(b, z, hid, hid, k, stride, "silu", g=hid)
            sq = max(1, c // 4)
            e = b.node("GlobalAveragePool", [z])
            e = _act(b, b.conv(e, hid, sq, 1, bias=True), "silu")
            e = b.node("Sigmoid", [b.conv(e, sq, hid, 1, bias=True)])
            z = _cba(b, b.node("Mul", [z, e]), hid, cout, 1, 1, "")
            y = b.node("Add", [y, z]) if stride == 1 and c == cout else z
            c = cout
    _head(b, _cba(b, y, c, 1280, 1, 1, "silu"), 1280)
    return b.model()


def densenet121() -> onnx.ModelProto:
    """torchvision densenet121: pre-activation dense layers on concatenations, 121 BNs."""
    b = Builder("densenet121", seed=23)
    y = _cba(b, b.input("input", ["N", 3, 224, 224]), 3, 64, 7, 2, "relu")
    y = b.node("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for bi, layers in enumerate((6, 12, 24, 16)):
        feats = [y]
        for _ in range(layers):
            x = b.node("Concat", feats, axis=1) if len(feats) > 1 else feats[0]
            cin = c + 32 * (len(feats) - 1)
            z = b.conv(b.relu(b.bn(x, cin)), cin, 128, 1)
            z = b.conv(b.relu(b.bn(z, 128)), 128, 32, 3)
            feats.append(z)
        c += 32 * layers
        y = b.node("Concat", feats, axis=1)
        if bi < 3:
            y = b.conv(b.relu(b.bn(y, c)), c, c // 2, 1)
            y = b.node("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
            c //= 2
    _head(b, b.relu(b.bn(y, c)), c)
    return b.model()


def resnet50() -> onnx.ModelProto:
    """torchvision resnet50: bottlenecks [3, 4, 6, 3], 53 BNs, 25.6M parameters."""
    b = Builder("resnet50", seed=24)
    y = _cba(b, b.input("input", ["N", 3, 224, 224]), 3, 64, 7, 2, "relu")
    y = b.node("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            z = _cba(b, y, c, mid, 1, 1, "relu")
            z = _cba(b, z, mid, mid, 3, s, "relu")
            z = _cba(b, z, mid, mid * 4, 1, 1, "")
            short = y if (s == 1 and c == mid * 4) else _cba(b, y, c, mid * 4, 1, s, "")
            y = b.relu(b.node("Add", [z, short]))
            c = mid * 4
    _head(b, y, c)
    return b.model()


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
    "densenet121": densenet121,
    "resnet50": resnet50,
}

# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # this checkout's bnfuse (python -m from ROOT puts it first on sys.path), with its
    # bytecode cached as an installed package has it (pip compiles at install time; with
    # PYTHONDONTWRITEBYTECODE set, every run would compile bnfuse's sources: ~50 ms)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
    dt = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return dt


def alternate(cmds: dict[str, list[str]], reps: int) -> dict[str, float]:
    """Median wall seconds of each command, run alternately after one warm-up each."""
    for cmd in cmds.values():
        timed(cmd)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(reps):
        for k, cmd in cmds.items():
            times[k].append(timed(cmd))
    return {k: statistics.median(v) for k, v in times.items()}


BNFUSE = [sys.executable, "-m", "bnfuse"]
PY = [sys.executable]


#: imports whose cumulative time (with everything they pull in) the breakdown lists
KEY_IMPORTS = ("bnfuse.cli", "bnfuse.api", "numpy", "onnx", "ml_dtypes", "bnfuse.onnx.backend",
               "bnfuse.report", "rich.console")  # fmt: skip


def import_breakdown(
    src: Path, dst: Path, top: int = 12
) -> tuple[list[tuple[str, float]], dict[str, float], float]:
    """Self ms per top-level package (largest first), cumulative ms of KEY_IMPORTS, and
    the total of every import, for one ``bnfuse SRC -o DST --no-validate`` run."""
    r = subprocess.run(
        [*PY, "-X", "importtime", "-m", "bnfuse", str(src), "-o", str(dst), "--no-validate"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    self_ms: dict[str, float] = {}
    cumulative: dict[str, float] = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        mod = m.group(4)
        pkg = mod.split(".")[0]
        self_ms[pkg] = self_ms.get(pkg, 0.0) + int(m.group(1)) / 1000
        if mod in KEY_IMPORTS:
            cumulative[mod] = int(m.group(2)) / 1000
    ranked = sorted(self_ms.items(), key=lambda kv: -kv[1])[:top]
    return ranked, cumulative, sum(self_ms.values())


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    import ml_dtypes
    import onnxruntime

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bnfuse-startup-") as tmp:
        work = Path(tmp)
        srcs: dict[str, Path] = {}
        rows = []
        for name in args.models:
            src = work / f"{name}.onnx"
            onnx.save(MODELS[name](), src)
            srcs[name] = src
        floor = alternate({"python": [*PY, "-c", "pass"]}, args.reps)["python"]
        for name, src in srcs.items():
            t = alternate(
                {
                    "bnfuse": [*BNFUSE, str(src), "-o", str(work / f"{name}.b.onnx"),
                               "--no-validate", "-q"],
                    "ort": [*PY, "-c", ORT_SCRIPT, str(src), str(work / f"{name}.o.onnx")],
                },
                args.reps,
            )  # fmt: skip
            bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
            size = src.stat().st_size / 1e6
            rows.append((name, size, bns, t["bnfuse"], t["ort"]))
            print(f"{name}: bnfuse {t['bnfuse']:.3f} s, onnxruntime {t['ort']:.3f} s", flush=True)
        all_t: dict[str, float] = {}
        if len(srcs) > 1:
            pairs = [a for s in srcs.values() for a in (str(s), str(work / f"{s.stem}.o4.onnx"))]
            all_t = alternate(
                {
                    "bnfuse": [*BNFUSE, *map(str, srcs.values()), "-o", str(work / "all"),
                               "--no-validate", "-q"],
                    "ort": [*PY, "-c", ORT_SCRIPT, *pairs],
                },
                args.reps,
            )  # fmt: skip
            print(f"all: bnfuse {all_t['bnfuse']:.3f} s, onnxruntime {all_t['ort']:.3f} s")
        help_t = alternate({"help": [*BNFUSE, "--help"]}, args.reps)["help"]
        print(f"bnfuse --help {help_t:.3f} s; python -c pass {floor:.3f} s")
        first = next(iter(srcs))
        ranked, cumulative, total = import_breakdown(srcs[first], work / "imp.onnx")

    cpu = platform.processor() or platform.machine()
    lines += [
        "# Start-up: whole process, bnfuse vs onnxruntime's offline optimizer",
        "",
        f"Written by `benchmarks/startup.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" ({cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnx "
        f"{onnx.__version__}, ml_dtypes {ml_dtypes.__version__}, onnxruntime "
        f"{onnxruntime.__version__}); medians of {args.reps} alternating runs after a warm-up. "
        "Do not edit by hand; rerun the script.",
        "",
        "bnfuse: `python -m bnfuse M -o F --no-validate -q`; onnxruntime: a fresh `python -c` "
        "creating an `InferenceSession` at ORT_ENABLE_BASIC with `optimized_model_filepath`. "
        "Models: torchvision-style exports built in code (224x224, 1000 classes, BN nodes "
        "kept).",
        "",
        "| model | MB | BNs | bnfuse s | onnxruntime s | ratio | target <= 1.5x |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, size, bns, tb, to in rows:
        lines.append(
            f"| {name} | {size:.1f} | {bns} | {tb:.3f} | {to:.3f} | {tb / to:.2f} | "
            f"{_verdict(tb / to <= 1.5)} |"
        )
    if all_t:
        r = all_t["bnfuse"] / all_t["ort"]
        lines += [
            "",
            f"The {len(srcs)} models in one run: bnfuse {all_t['bnfuse']:.3f} s, one Python "
            f"process running onnxruntime over them {all_t['ort']:.3f} s: ratio {r:.2f} "
            f"(target <= 1.0: {_verdict(r <= 1.0)}).",
        ]
    lines += [
        "",
        f"`bnfuse --help`: {help_t:.3f} s (target <= 0.3 s: {_verdict(help_t <= 0.3)}); "
        f"`python -c pass` on this machine: {floor:.3f} s.",
        "",
        f"Import breakdown of `bnfuse {first}.onnx -o F --no-validate` "
        f"(`python -X importtime`): {total:.0f} ms of imports in all. Self time summed per "
        "top-level package:",
        "",
        "| package | self ms |",
        "|---|---:|",
        *[f"| {p} | {ms:.1f} |" for p, ms in ranked],
        "",
        "Cumulative (the import with everything it pulls in, where this run first imports it):",
        "",
        "| import | ms |",
        "|---|---:|",
        *[f"| `{k}` | {cumulative[k]:.1f} |" for k in KEY_IMPORTS if k in cumulative],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text, encoding="utf-8")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
