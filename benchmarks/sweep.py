"""Sweep real architectures and exporter shapes through the bnfuse command line.

Every case builds a model in code (``weights=None``: nothing is downloaded), small inputs,
randomized BN statistics, writes it in a format a user would hand to bnfuse, then runs the
whole CLI process as users do::

    python -m bnfuse SRC -o OUT --report r.json -q

and checks: exit status 0, fewer BN(-equivalent) nodes after than before (unless the model
has nothing foldable), and the fused file's outputs against the original's on random
inputs (Keras: the framework that wrote it loads both files; ONNX: onnxruntime with
graph optimizations disabled). One line per case, then a summary table.

    python benchmarks/sweep.py            # everything (~15 min on 2 cores)
    python benchmarks/sweep.py --quick    # one case per group (~3 min)
    python benchmarks/sweep.py --only k3-mobilenet,onnx-convT   # name substrings
    python benchmarks/sweep.py --list

Exit status 1 if any case crashed or failed a check, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from sweep_models import HAND_BUILT, bn_count  # noqa: E402

#: relative error (max |a-b| / max(1, max |a|)) a fused model may show
TOL = 1e-3


@dataclass
class Built:
    src: Path
    out: Path
    kind: str  # "keras3", "tf_keras", "onnx"
    expect_folds: bool = True
    #: the exit status a correct bnfuse gives (3: the framework itself cannot load the file)
    expect_rc: int = 0
    #: the largest relative error allowed (float16 arithmetic: float16's rounding)
    tol: float = TOL


@dataclass
class Case:
    name: str
    group: str
    build: Callable[[Path], Built]
    quick: bool = False


@dataclass
class Row:
    name: str
    group: str
    status: str = "ok"
    rc: int | None = None
    folded: int = 0
    refused: int = 0
    bn_before: int | None = None
    bn_after: int | None = None
    err: float | None = None
    build_s: float = 0.0
    cli_s: float = 0.0
    detail: str = ""
    refusal_kinds: dict[str, int] = field(default_factory=dict)


# ---- Keras builders ----------------------------------------------------------------------


def _randomize(model: Any, seed: int) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "keras"))
    from keras_helpers import randomize

    randomize(model, seed=seed, gentle=True)


def _fresh(module: str) -> Any:
    """The Keras module ``keras`` or ``tf_keras``, with a cleared session and seed 0, so
    every case builds the same model whatever ran before it."""
    import importlib

    k = importlib.import_module(module)
    k.backend.clear_session()
    k.utils.set_random_seed(0)
    return k


def _app(module: str, cls: str, size: int, **kw: Any) -> Callable[[], Any]:
    """A keras.applications builder of ``module`` (``keras`` or ``tf_keras``)."""

    def make() -> Any:
        fn = getattr(_fresh(module).applications, cls)
        return fn(weights=None, input_shape=(size, size, 3), classes=10, **kw)

    return make


def _k3_mixed() -> Any:
    """A mixed_float16 model: float16 layers, a float32 output layer."""
    keras = _fresh("keras")
    L = keras.layers

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = keras.Input((32, 32, 3))
        h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3)(x)))
        h = L.BatchNormalization()(L.DepthwiseConv2D(3)(h))
        h = L.Dense(10)(L.GlobalAveragePooling2D()(h))
        return keras.Model(x, L.Activation("linear", dtype="float32")(h))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _k2_mixed() -> Any:
    tf_keras = _fresh("tf_keras")
    L = tf_keras.layers

    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = tf_keras.Input((32, 32, 3))
        h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3)(x)))
        h = L.Dense(10)(L.Flatten()(h))
        return tf_keras.Model(x, L.Activation("linear", dtype="float32")(h))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def _k3_transfer() -> Any:
    """Transfer learning: a keras.applications base model nested as one layer of a
    Sequential, preprocessing before it, BN + Dense head after."""
    keras = _fresh("keras")
    L = keras.layers

    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(64, 64, 3), pooling="avg"
    )
    return keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            L.Rescaling(1 / 127.5, offset=-1),
            base,
            L.BatchNormalization(),
            L.Dense(10),
        ]
    )


def _k3_siamese_sync() -> Any:
    """A shared encoder (one submodel called twice) and a synchronized BN."""
    keras = _fresh("keras")
    L = keras.layers

    enc = keras.Sequential([keras.Input((8,)), L.Dense(6), L.BatchNormalization()], name="enc")
    a, b = keras.Input((8,)), keras.Input((8,))
    h = L.Concatenate()([enc(a), enc(b)])
    h = L.BatchNormalization(synchronized=True)(L.Dense(5)(h))
    return keras.Model([a, b], h)


#: name -> (builder, file suffix)
KERAS3_EXTRA: dict[str, tuple[Callable[[], Any], str]] = {
    "mixed_float16": (_k3_mixed, "keras"),
    "transfer_nested": (_k3_transfer, "keras"),
    "siamese_sync": (_k3_siamese_sync, "keras"),
    "legacy_h5": (_k3_siamese_sync, "h5"),
}


def keras3_extra_case(name: str, spec: tuple[Callable[[], Any], str]) -> Callable[[Path], Built]:
    make, suffix = spec

    def build(work: Path) -> Built:
        model = make()
        _randomize(model, seed=len(name))
        src = work / f"{name}.{suffix}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(src)
        tol = 1e-2 if "float16" in name else TOL
        return Built(src, work / f"{name}.fused.{suffix}", "keras3", tol=tol)

    return build


def keras3_case(name: str, make: Callable[[], Any], expect: bool = True) -> Callable[[Path], Built]:
    def build(work: Path) -> Built:
        model = make()
        _randomize(model, seed=len(name))
        src = work / f"{name}.keras"
        model.save(src)
        return Built(src, work / f"{name}.fused.keras", "keras3", expect)

    return build


#: tf_keras cannot load its own ConvNeXt files: .h5 needs custom_objects for LayerScale,
#: the Keras 2 .keras file fails inside tf_keras; bnfuse must say so (exit 3), not crash
UNLOADABLE = ("k2-ConvNeXtTiny-",)


def tfkeras_case(
    name: str, make: Callable[[], Any], fmt: str, expect: bool = True
) -> Callable[[Path], Built]:
    def build(work: Path) -> Built:
        model = make()
        _randomize(model, seed=len(name))
        if fmt == "savedmodel":
            src = work / f"{name}_sm"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save(str(src), save_format="tf")
            out = work / f"{name}_sm_fused"  # a SavedModel output: a path without a suffix
        else:
            src = work / f"{name}.{fmt}"
            model.save(str(src))
            out = work / f"{name}.fused.{fmt}"
        rc = 3 if name.startswith(UNLOADABLE) else 0
        return Built(src, out, "tf_keras", expect, rc, 1e-2 if "float16" in name else TOL)

    return build


def tf2onnx_case(
    name: str, make: Callable[[], Any], opset: int, via: str
) -> Callable[[Path], Built]:
    def build(work: Path) -> Built:
        import tensorflow as tf
        import tf2onnx

        model = make()
        _randomize(model, seed=len(name))
        spec = (tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="x"),)
        src = work / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if via == "from_function":
                fn = tf.function(lambda x: model(x, training=False))
                tf2onnx.convert.from_function(
                    fn, input_signature=spec, opset=opset, output_path=str(src)
                )
            else:
                tf2onnx.convert.from_keras(
                    model, input_signature=spec, opset=opset, output_path=str(src)
                )
        # tf2onnx folds many BNs itself: a file without any left is still a valid case
        expect = bn_count(src) > 0 and not name.startswith(NOTHING_TO_FOLD)
        return Built(src, work / f"{name}.fused.onnx", "onnx", expect)

    return build


def keras3_onnx_case(name: str, make: Callable[[], Any]) -> Callable[[Path], Built]:
    def build(work: Path) -> Built:
        import keras

        model = make()
        _randomize(model, seed=len(name))
        src = work / f"{name}.onnx"
        spec = [keras.InputSpec(shape=(None, *model.inputs[0].shape[1:]), dtype="float32")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(src), format="onnx", verbose=False, input_signature=spec)
        expect = bn_count(src) > 0 and not name.startswith(NOTHING_TO_FOLD)
        return Built(src, work / f"{name}.fused.onnx", "onnx", expect)

    return build


#: cases whose BN(-equivalent)s left are all legitimately refused (see RESULTS-sweep.md):
#: ResNet50V2's pre-activation BNs sit between an Add/MaxPool and a ReLU; tf2onnx already
#: folded EfficientNetV2B0's BNs, what is left is the Rescaling before the padded stem Conv;
#: a BN over axis 1 of a rank-3 MatMul normalizes rows, not the MatMul's features
NOTHING_TO_FOLD = (
    "onnx-matmul_batched",
    "tf2onnx-ResNet50V2",
    "k3onnx-ResNet50V2",
    "tf2onnx-EfficientNetV2B0",
)


def hand_case(name: str, make: Callable[[], Any]) -> Callable[[Path], Built]:
    def build(work: Path) -> Built:
        import onnx

        src = work / f"{name}.onnx"
        onnx.save(make(), str(src))
        tol = 1e-2 if "fp16" in name else TOL
        return Built(
            src, work / f"{name}.fused.onnx", "onnx", not name.startswith(NOTHING_TO_FOLD), tol=tol
        )

    return build


#: (name, keras.applications class, input size); ConvNeXt has LayerNorm only (nothing to
#: fold: it must come through unchanged). Keras 3 has no RegNet (tf_keras has).
K3 = [
    ("MobileNet", "MobileNet", 64),
    ("MobileNetV3Small", "MobileNetV3Small", 64),
    ("MobileNetV3Large", "MobileNetV3Large", 64),
    ("ResNet50V2", "ResNet50V2", 64),
    ("InceptionV3", "InceptionV3", 75),
    ("InceptionResNetV2", "InceptionResNetV2", 75),
    ("EfficientNetV2B0", "EfficientNetV2B0", 64),
    ("ConvNeXtTiny", "ConvNeXtTiny", 32),
]
K2 = [
    *K3[:2],
    K3[3],
    K3[4],
    K3[6],
    ("RegNetX002", "RegNetX002", 64),
    ("RegNetY002", "RegNetY002", 64),
    K3[7],
]
#: the other tf_keras formats (slower to write) and exporters, on fewer families
K2_OTHER_FORMATS = ("MobileNet", "MobileNetV3Small")
TF2ONNX = [
    ("MobileNet", 13),
    ("MobileNet", 17),
    ("MobileNetV3Small", 13),
    ("MobileNetV3Small", 17),
    ("ResNet50V2", 13),
    ("InceptionV3", 13),
    ("EfficientNetV2B0", 13),
]
K3_ONNX = ("MobileNet", "MobileNetV3Small", "ResNet50V2", "InceptionV3", "EfficientNetV2B0")
QUICK = {
    "k3-MobileNet",
    "k3-mixed_float16",
    "k2-MobileNet-h5",
    "k2-MobileNet-savedmodel",
    "tf2onnx-MobileNet-op13",
    "k3onnx-MobileNet",
}


def _spec(name: str) -> tuple[str, int]:
    for n, cls, size in [*K3, *K2]:
        if n == name:
            return cls, size
    raise KeyError(name)


def cases() -> list[Case]:
    out: list[Case] = []

    def add(name: str, group: str, build: Callable[[Path], Built], quick: bool = False) -> None:
        out.append(Case(name, group, build, quick or name in QUICK))

    for name, cls, size in K3:
        n = f"k3-{name}"
        add(n, "keras3 .keras", keras3_case(n, _app("keras", cls, size), "ConvNeXt" not in name))
    for name, make in KERAS3_EXTRA.items():
        add(f"k3-{name}", "keras3 .keras/.h5 extra", keras3_extra_case(f"k3-{name}", make))
    for name, cls, size in K2:
        fmts = ("h5", "savedmodel", "keras") if name in K2_OTHER_FORMATS else ("h5",)
        for fmt in fmts:
            n = f"k2-{name}-{fmt}"
            build = tfkeras_case(n, _app("tf_keras", cls, size), fmt, "ConvNeXt" not in name)
            add(n, f"tf_keras {fmt}", build)
    add("k2-mixed_float16-h5", "tf_keras h5", tfkeras_case("k2-mixed_float16-h5", _k2_mixed, "h5"))
    for name, opset in TF2ONNX:
        n = f"tf2onnx-{name}-op{opset}"
        add(
            n,
            "tf2onnx from_keras",
            tf2onnx_case(n, _app("tf_keras", *_spec(name)), opset, "from_keras"),
        )
    n = "tf2onnx-fn-MobileNet"
    add(
        n,
        "tf2onnx from_function",
        tf2onnx_case(n, _app("tf_keras", *_spec("MobileNet")), 13, "from_function"),
    )
    for name in K3_ONNX:
        n = f"k3onnx-{name}"
        add(n, "keras3 export onnx", keras3_onnx_case(n, _app("keras", *_spec(name))))
    for name, hand in HAND_BUILT.items():
        add(f"onnx-{name}", "hand-built onnx", hand_case(f"onnx-{name}", hand), True)
    return out


# ---- running one case --------------------------------------------------------------------


def run_cli(b: Built, report: Path) -> tuple[int, str, float]:
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        "-m",
        "bnfuse",
        str(b.src),
        "-o",
        str(b.out),
        "--report",
        str(report),
        "-q",
    ]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    tail = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return p.returncode, (tail[-1] if tail else ""), time.perf_counter() - t0


def _rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x64.shape != y64.shape:
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(x64))) if x64.size else 1.0)
        worst = max(worst, float(np.max(np.abs(x64 - y64))) / scale if x64.size else 0.0)
    return worst


def compare(b: Built) -> float:
    """Max relative error of the fused file against the original, each loaded from disk."""
    rng = np.random.default_rng(7)
    if b.kind == "onnx":
        import onnx
        from _common import ort_outputs, random_feeds
        from onnx.helper import tensor_dtype_to_np_dtype

        proto = onnx.load(str(b.src), load_external_data=False)
        dtypes = {
            v.name: tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            for v in proto.graph.input
        }
        feeds = random_feeds(proto, seed=3)
        for k, v in feeds.items():
            feeds[k] = rng.normal(0, 1, v.shape).astype(dtypes[k])
        return _rel(ort_outputs(b.src, feeds), ort_outputs(b.out, feeds))
    if b.kind == "keras3":
        import keras

        load = keras.saving.load_model
    else:
        import tf_keras

        load = tf_keras.models.load_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m0, m1 = load(str(b.src), compile=False), load(str(b.out), compile=False)
    xs = [
        rng.normal(0, 1, (2, *[int(d) for d in t.shape[1:]])).astype(np.float32) for t in m0.inputs
    ]
    x = xs[0] if len(xs) == 1 else xs
    outs = []
    for m in (m0, m1):
        y = m(x, training=False)
        ys = y if isinstance(y, list | tuple) else [y]
        outs.append([np.asarray(t) for t in ys])
    return _rel(outs[0], outs[1])


def run_case(case: Case, work: Path) -> Row:
    row = Row(case.name, case.group)
    t0 = time.perf_counter()
    try:
        b = case.build(work)
    except Exception as e:  # a model that cannot be built is a skip, not ours
        row.status, row.detail = "skip", f"build failed: {type(e).__name__}: {str(e)[:160]}"
        return row
    row.build_s = time.perf_counter() - t0
    report = work / f"{case.name}.report.json"
    row.rc, tail, row.cli_s = run_cli(b, report)
    if row.rc != b.expect_rc:
        row.status, row.detail = "FAIL", f"exit {row.rc}: {tail[:200]}"
        return row
    if row.rc != 0:
        row.status, row.detail = "ok", f"expected exit {row.rc}: {tail[:160]}"
        return row
    r = json.loads(report.read_text())
    row.folded, row.refused = len(r["folds"]), len(r["refusals"])
    for ref in r["refusals"]:
        key = re.sub(r"'[^']*'", "'…'", str(ref.get("reason", "")))[:90]
        row.refusal_kinds[key] = row.refusal_kinds.get(key, 0) + 1
    if b.kind == "onnx":
        row.bn_before, row.bn_after = bn_count(b.src), bn_count(b.out)
    else:
        row.bn_before, row.bn_after = r["before"]["bn_nodes"], r["after"]["bn_nodes"]
    problems = []
    if b.expect_folds and not row.bn_after < row.bn_before:
        problems.append(f"BNs not reduced ({row.bn_before} -> {row.bn_after})")
    try:
        row.err = compare(b)
    except Exception as e:  # the fused file does not load or run: a failure
        problems.append(f"compare failed: {type(e).__name__}: {str(e)[:160]}")
    else:
        if not row.err <= b.tol:
            problems.append(f"max rel error {row.err:.2e} > {b.tol:g}")
    if problems:
        row.status, row.detail = "FAIL", "; ".join(problems)
    return row


def line(row: Row) -> str:
    err = "-" if row.err is None else f"{row.err:.1e}"
    bns = f"{row.bn_before}->{row.bn_after}" if row.bn_before is not None else "-"
    return (
        f"{row.status:4} {row.name:34} rc={row.rc!s:4} folded={row.folded:<4} "
        f"refused={row.refused:<4} bn={bns:9} err={err:8} build={row.build_s:5.1f}s "
        f"cli={row.cli_s:5.1f}s {row.detail}"
    )


def summary(rows: list[Row]) -> str:
    head = "| case | group | status | exit | folded | refused | BN-equiv before→after | max rel err | build s | cli s |"
    out = [head, "|" + "---|" * 10]
    for r in rows:
        bns = f"{r.bn_before}→{r.bn_after}" if r.bn_before is not None else "-"
        err = "-" if r.err is None else f"{r.err:.1e}"
        out.append(
            f"| {r.name} | {r.group} | {r.status} | {r.rc} | {r.folded} | {r.refused} | "
            f"{bns} | {err} | {r.build_s:.1f} | {r.cli_s:.1f} |"
        )
    kinds: dict[str, int] = {}
    where: dict[str, list[str]] = {}
    for r in rows:
        for k, n in r.refusal_kinds.items():
            kinds[k] = kinds.get(k, 0) + n
            where.setdefault(k, []).append(r.name)
    if kinds:
        out += ["", "| refusal reason (names elided) | count | cases |", "|---|---|---|"]
        out += [
            f"| {k} | {n} | {', '.join(where[k])} |"
            for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few cases per group (~3 min)")
    ap.add_argument("--only", default="", help="comma-separated prefixes of case names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--markdown", type=Path, help="also write the summary table here")
    ap.add_argument("--keep", type=Path, help="build the models and reports in this directory")
    args = ap.parse_args(argv)
    todo = cases()
    if args.quick:
        todo = [c for c in todo if c.quick]
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        todo = [c for c in todo if any(c.name.startswith(k) for k in keys)]
    if args.list:
        for c in todo:
            print(f"{'*' if c.quick else ' '} {c.name:36} {c.group}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows: list[Row] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfuse-sweep-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        for case in todo:
            row = run_case(case, work)
            rows.append(row)
            print(line(row), flush=True)
    table = summary(rows)
    print()
    print(table)
    bad = [r for r in rows if r.status == "FAIL"]
    skipped = [r for r in rows if r.status == "skip"]
    print(
        f"\n{len(rows)} cases, {len(bad)} failed, {len(skipped)} skipped, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
