"""``make demo``: fuse the shipped sample models with bnfuse and check they still classify.

For every model this runs the real command line (``python -m bnfuse MODEL -o out/... --bench``)
so you see bnfuse's own terminal report, then measures accuracy on the held-out digits
split before and after fusing and counts the test images whose predicted class changed.
ONNX models run in onnxruntime with graph optimizations disabled; Keras models as
``model(x, training=False)``. Keras models are skipped (with a note) when bnfuse's Keras
backend is not importable.

Outputs (fused models, JSON and, with the ``html`` extra, HTML reports) go to ``out/``
at the repository root (git-ignored). Exits 1 if bnfuse failed on a
model or a fused model predicts a different class for any test image.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "out"
DATA = HERE / "digits_test.npz"
ONNX_MODELS = ("digits_cnn_bn.onnx", "digits_mlp.onnx", "digits_cnn.onnx")
KERAS_MODELS = ("digits_mlp.keras", "digits_cnn.keras")
KERAS2_MODELS = ("digits_mlp_k2.h5",)  # tf_keras (Keras 2): written back as Keras 2 .h5
BENCH = ("--bench", "--batch", "1,32", "--bench-seconds", "3")


def rule(title: str) -> None:
    print(f"\n{'=' * 20} {title} {'=' * max(0, 58 - len(title))}", flush=True)


def run_bnfuse(model: Path) -> tuple[int, Path, dict[str, Any] | None]:
    """Fuse ``model`` through the CLI; return (exit code, output path, JSON report)."""
    stem, ext = model.stem, model.suffix
    output = OUT / f"{stem}.fused{ext}"
    report = OUT / f"{stem}.report.json"
    for stale in (output, report):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bnfuse", str(model), "-o", str(output), *BENCH]
    cmd += ["--inputs", str(DATA), "--report", str(report)]
    if importlib.util.find_spec("matplotlib") is not None:  # the html extra: a page to open
        cmd += ["--report", str(OUT / f"{model.name}.report.html")]
    print("$ " + " ".join(_short(c) for c in cmd), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    code = subprocess.run(cmd, env=env, check=False).returncode
    data = json.loads(report.read_text()) if report.exists() else None
    return code, output, data


def _short(arg: str) -> str:
    if arg == sys.executable:
        return "python"
    try:
        return str(Path(arg).relative_to(ROOT))
    except ValueError:
        return arg


def onnx_predict(path: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: x[i.name] for i in sess.get_inputs()}
    return np.asarray(sess.run(None, feeds)[0]).argmax(-1)


def keras_predict(path: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    import keras

    model = keras.saving.load_model(path)
    name = model.inputs[0].name
    return np.asarray(model(x[name], training=False)).argmax(-1)


def keras2_predict(path: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    """What a TensorFlow 2.x deployment does: load with tf.keras (Keras 2) and predict."""
    import tf_keras

    model = tf_keras.models.load_model(str(path), compile=False)
    name = model.input_names[0]
    return np.asarray(model(x[name], training=False)).argmax(-1)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    with np.load(DATA) as npz:
        data = {k: npz[k] for k in npz.files}
    labels = data.pop("labels")
    rows: list[tuple[str, str, str, str, str]] = []
    failed: list[str] = []

    def one(name: str, predict: Any) -> None:
        rule(name)
        code, output, report = run_bnfuse(HERE / name)
        folds = "?"
        if report is not None:
            n_bn = len(report["folds"]) + len(report["refusals"])
            folds = f"{len(report['folds'])}/{n_bn}"
        if code != 0 or not output.exists():
            failed.append(f"{name}: bnfuse exited with code {code}")
            rows.append((name, folds, "-", "-", f"bnfuse exit {code}"))
            return
        before = predict(HERE / name, data)
        after = predict(output, data)
        changed = int(np.sum(before != after))
        if changed:
            failed.append(f"{name}: {changed} test prediction(s) changed after fusing")
        acc_b, acc_a = np.mean(before == labels), np.mean(after == labels)
        print(
            f"\naccuracy on the {len(labels)} held-out digits: {acc_b:.4f} before, "
            f"{acc_a:.4f} after fusing; predictions changed: {changed}",
            flush=True,
        )
        rows.append((name, folds, f"{acc_b:.4f}", f"{acc_a:.4f}", str(changed)))

    for name in ONNX_MODELS:
        one(name, onnx_predict)

    try:
        import bnfuse.keras.backend  # noqa: F401
    except ImportError as exc:
        print(
            f"\nnote: skipping the Keras sample models: bnfuse's Keras backend is not "
            f"available ({type(exc).__name__}: {exc})",
            flush=True,
        )
    else:
        for name in KERAS_MODELS:
            one(name, keras_predict)
        try:
            import tf_keras  # noqa: F401
        except ImportError:
            print("\nnote: skipping the Keras 2 sample: tf-keras is not installed", flush=True)
        else:
            for name in KERAS2_MODELS:
                one(name, keras2_predict)

    rule("summary")
    header = ("model", "BN folded", "acc before", "acc after", "changed")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        "\nBN folded counts BatchNormalization nodes/layers and BN-equivalent affines that bnfuse "
        "recognised; Keras's ONNX exports spell BN as Mul+Add."
    )
    print(f"fused models and JSON reports: {_short(str(OUT))}/")
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    print("\nall fused models predict exactly the same classes as the originals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
