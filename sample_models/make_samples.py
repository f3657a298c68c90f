"""Train and export bnfuse's sample models on scikit-learn's digits (``make samples``).

Everything is trained for real, so every BatchNormalization carries genuine running
statistics. Data: :func:`sklearn.datasets.load_digits` (8x8 images, 10 classes, shipped
inside scikit-learn, no download), split once with
``train_test_split(test_size=0.25, random_state=0, stratify=y)``. Pixels are left RAW
(float32 counts 0..16): standardizing them is the job of the models' own BatchNormalization
layers (the MLP's first layer is one).

Writes, next to this file:

* ``digits_mlp.keras``     Keras MLP, input (8, 8): BN first layer, Dense->BN->ReLU, and
                           Dense(relu)->BN->Dense (BN after the activation); logits.
* ``digits_cnn.keras``     Keras CNN, input (8, 8, 1): Conv2D->BN->ReLU,
                           DepthwiseConv2D->BN->ReLU, SeparableConv2D->BN->ReLU, then
                           BN after the ReLU feeding a padding="valid" Conv2D; GAP; softmax.
* ``digits_mlp.onnx``, ``digits_cnn.onnx``  the two above through Keras's own ONNX
                           exporter (``model.export(path, format="onnx")``, tf2onnx).
* ``digits_cnn_bn.onnx``   an NCHW ONNX CNN built node by node with ``onnx.helper``, with
                           real BatchNormalization nodes (Conv->BN->Relu, grouped
                           Conv->BN->Relu, MaxPool->BN->Flatten->Gemm, Gemm->BN->Relu),
                           transcribed from a trained channels_last Keras twin and checked
                           against it with onnxruntime (graph optimizations disabled).
* ``digits_mlp_k2.h5``     a Keras 2 (``tf_keras``) MLP saved as HDF5, the BN notes' own case:
                           ``BatchNormalization(axis=[1, 2])`` as the first layer (one scale
                           and shift per pixel, which Keras 3 cannot express), Flatten,
                           Dense->BN->ReLU, Dense logits.
* ``digits_test.npz``      the held-out split: ``pixels`` (N, 8, 8), ``image`` (N, 8, 8, 1),
                           ``image_nchw`` (N, 1, 8, 8), all float32, and ``labels`` (int64).

Run with ``python sample_models/make_samples.py`` (seconds on a laptop CPU); ``... keras2``
rebuilds only ``digits_mlp_k2.h5``. The seed is
fixed and TensorFlow runs with op determinism, so a rerun on the same machine and versions
reproduces the same weights.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0
EPS = 1e-3  # Keras BatchNormalization's default epsilon; copied into the ONNX BN nodes
OPSET = 15
MAX_BYTES = 1_000_000


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``; x is float32 (N, 8, 8) raw pixel counts 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


def seed_everything() -> None:
    import keras
    import tensorflow as tf

    os.environ["PYTHONHASHSEED"] = str(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------------------------------
# Keras models
# ---------------------------------------------------------------------------------------


def build_mlp():  # -> keras.Model
    """(8, 8) -> BN (first layer, per pixel column) -> Flatten -> ... -> logits."""
    import keras
    from keras import layers

    inp = keras.Input((8, 8), name="pixels")
    x = layers.BatchNormalization(name="bn_input")(inp)  # forward: through Flatten into dense_1
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, name="dense_1")(x)
    x = layers.BatchNormalization(name="bn_1")(x)  # backward into dense_1
    x = layers.ReLU(name="relu_1")(x)
    x = layers.Dense(32, use_bias=False, name="dense_2")(x)
    x = layers.BatchNormalization(name="bn_2")(x)  # backward into dense_2 (no bias)
    x = layers.ReLU(name="relu_2")(x)
    x = layers.Dense(32, activation="relu", name="dense_3")(x)
    x = layers.BatchNormalization(name="bn_3")(x)  # after the activation: forward into logits
    out = layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="digits_mlp")


def build_cnn():  # -> keras.Model
    """(8, 8, 1) -> conv / depthwise / separable blocks with BN -> GAP -> softmax."""
    import keras
    from keras import layers

    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv_1")(inp)
    x = layers.BatchNormalization(name="bn_1")(x)  # backward into conv_1
    x = layers.ReLU(name="relu_1")(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw_2")(x)
    x = layers.BatchNormalization(name="bn_2")(x)  # backward into the depthwise conv
    x = layers.ReLU(name="relu_2")(x)
    x = layers.SeparableConv2D(32, 3, padding="same", name="sep_3")(x)
    x = layers.BatchNormalization(name="bn_3")(x)  # backward into the pointwise half
    x = layers.ReLU(name="relu_3")(x)
    x = layers.BatchNormalization(name="bn_4")(x)  # after the activation: forward into conv_4
    x = layers.Conv2D(32, 3, padding="valid", activation="relu", name="conv_4")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="digits_cnn")


def build_cnn_bn_twin():  # -> keras.Model
    """channels_last twin of ``digits_cnn_bn.onnx``; its trained weights are transcribed."""
    import keras
    from keras import layers

    inp = keras.Input((8, 8, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", name="conv_1")(inp)
    x = layers.BatchNormalization(name="bn_1")(x)
    x = layers.ReLU(name="relu_1")(x)
    x = layers.Conv2D(32, 3, padding="same", groups=4, name="gconv_2")(x)
    x = layers.BatchNormalization(name="bn_2")(x)
    x = layers.ReLU(name="relu_2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.BatchNormalization(name="bn_3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, name="fc_1")(x)
    x = layers.BatchNormalization(name="bn_4")(x)
    x = layers.ReLU(name="relu_4")(x)
    out = layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="digits_cnn_bn_twin")


def build_mlp_k2():  # -> tf_keras.Model
    """Keras 2: (8, 8) -> BN over axes [1, 2] (per pixel) -> Flatten -> Dense -> BN -> ReLU
    -> logits. The first BN folds forward through Flatten into dense_1 (64 entries), bn_1
    backward into dense_1."""
    import tf_keras
    from tf_keras import layers

    inp = tf_keras.Input((8, 8), name="pixels")
    x = layers.BatchNormalization(axis=[1, 2], name="bn_pixels")(inp)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, name="dense_1")(x)
    x = layers.BatchNormalization(name="bn_1")(x)
    x = layers.ReLU(name="relu_1")(x)
    out = layers.Dense(10, name="logits")(x)
    return tf_keras.Model(inp, out, name="digits_mlp_k2")


def make_keras2_sample(
    x_tr: np.ndarray, x_te: np.ndarray, y_tr: np.ndarray, y_te: np.ndarray
) -> float:
    """Train and save ``digits_mlp_k2.h5`` with tf_keras; returns its test accuracy."""
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    model = build_mlp_k2()
    model.compile(
        optimizer=tf_keras.optimizers.Adam(3e-3),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    model.fit(x_tr, y_tr, batch_size=32, epochs=20, shuffle=True, verbose=0)
    print(f"  {model.name}: 20 epochs in {time.perf_counter() - start:.1f} s (tf_keras)")
    path = HERE / "digits_mlp_k2.h5"
    path.unlink(missing_ok=True)
    model.save(str(path), save_format="h5", include_optimizer=False)
    ref = np.asarray(model(x_te, training=False))
    back = tf_keras.models.load_model(str(path), compile=False)
    check_same("digits_mlp_k2.h5 reloaded", ref, np.asarray(back(x_te, training=False)), 1e-6)
    return float(np.mean(ref.argmax(-1) == y_te))


def train(model, x: np.ndarray, y: np.ndarray, *, epochs: int, from_logits: bool) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    print(f"  {model.name}: {epochs} epochs in {time.perf_counter() - start:.1f} s")


def keras_predict(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


# ---------------------------------------------------------------------------------------
# ONNX export of the Keras models
# ---------------------------------------------------------------------------------------


def export_onnx(model, path: Path) -> str:
    """Export through Keras's exporter; fall back to tf2onnx directly. Returns the route."""
    try:
        model.export(str(path), format="onnx", verbose=False)
        return "keras model.export(format='onnx')"
    except Exception as exc:  # report exactly what failed, then try tf2onnx itself
        print(f"  keras exporter failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=model.inputs[0].name)]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET, output_path=str(path))
    return "tf2onnx.convert.from_keras"


# ---------------------------------------------------------------------------------------
# The hand-built NCHW ONNX CNN with real BatchNormalization nodes
# ---------------------------------------------------------------------------------------


def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    # Keras Conv2D kernel (kh, kw, in/g, out) -> ONNX Conv weight (out, in/g, kh, kw). For a
    # grouped conv both put group gi's outputs at gi*(out/g) .. and inputs likewise.
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def cnn_bn_to_onnx(twin):  # -> onnx.ModelProto
    """Transcribe the trained twin into an NCHW graph with BatchNormalization nodes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def bn(name: str, x: str) -> str:
        layer = twin.get_layer(name)
        gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    x,
                    const(f"{name}.scale", gamma),
                    const(f"{name}.bias", beta),
                    const(f"{name}.mean", mean),
                    const(f"{name}.var", var),
                ],
                [f"{name}.out"],
                name=name,
                epsilon=float(layer.epsilon),
            )
        )
        return f"{name}.out"

    def conv(name: str, x: str, groups: int = 1) -> str:
        kernel, bias = (np.asarray(w) for w in twin.get_layer(name).get_weights())
        nodes.append(
            helper.make_node(
                "Conv",
                [x, const(f"{name}.weight", _hwio_to_oihw(kernel)), const(f"{name}.bias", bias)],
                [f"{name}.out"],
                name=name,
                kernel_shape=list(kernel.shape[:2]),
                pads=[1, 1, 1, 1],  # Keras padding="same" for a 3x3 kernel, stride 1
                strides=[1, 1],
                group=groups,
            )
        )
        return f"{name}.out"

    def relu(name: str, x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    x = "image_nchw"
    x = relu("relu_1", bn("bn_1", conv("conv_1", x)))
    x = relu("relu_2", bn("bn_2", conv("gconv_2", x, groups=4)))
    nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool.out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        )
    )
    x = bn("bn_3", "pool.out")  # BN -> Flatten -> Gemm: a forward fold through Flatten
    nodes.append(helper.make_node("Flatten", [x], ["flatten.out"], name="flatten", axis=1))

    # Keras flattens NHWC (row h*W*C + w*C + c); ONNX flattens NCHW (row c*H*W + h*W + w).
    kernel, bias = (np.asarray(w) for w in twin.get_layer("fc_1").get_weights())
    h, w, c = twin.get_layer("pool").output.shape[1:]
    kernel_nchw = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    nodes.append(
        helper.make_node(  # torch-style Gemm: B is [N, K] with transB=1
            "Gemm",
            ["flatten.out", const("fc_1.weight", kernel_nchw.T), const("fc_1.bias", bias)],
            ["fc_1.out"],
            name="fc_1",
            transB=1,
        )
    )
    x = relu("relu_4", bn("bn_4", "fc_1.out"))
    kernel, bias = (np.asarray(w) for w in twin.get_layer("logits").get_weights())
    nodes.append(
        helper.make_node(
            "Gemm",
            [x, const("logits.weight", kernel), const("logits.bias", bias)],
            ["logits"],
            name="logits",
        )
    )
    graph = helper.make_graph(
        nodes,
        "digits_cnn_bn",
        [helper.make_tensor_value_info("image_nchw", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="bnfuse sample_models/make_samples.py",
        doc_string="Digits CNN (NCHW) transcribed from a trained Keras twin; real BN nodes.",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_predict(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run with every onnxruntime graph optimization disabled (no implicit BN fusion)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def check_same(name: str, ref: np.ndarray, got: np.ndarray, atol: float) -> None:
    diff = float(np.max(np.abs(ref - got)))
    changed = int(np.sum(ref.argmax(-1) != got.argmax(-1)))
    print(f"  {name}: max |diff| {diff:.2e}, changed predictions {changed}")
    if changed or diff > atol:
        raise SystemExit(f"{name}: ONNX does not reproduce Keras (max diff {diff}, {changed})")


def main(only: list[str] | None = None) -> None:
    import keras
    import onnx

    seed_everything()
    x_tr, x_te, y_tr, y_te = load_split()
    if only == ["keras2"]:
        acc_k2 = make_keras2_sample(x_tr, x_te, y_tr, y_te)
        print(f"  digits_mlp_k2.h5 accuracy {acc_k2:.4f}")
        return
    img_tr, img_te = x_tr[..., None], x_te[..., None]
    feeds = {
        "pixels": x_te,
        "image": img_te,
        "image_nchw": np.ascontiguousarray(img_te.transpose(0, 3, 1, 2)),
    }
    acc: dict[str, float] = {}

    def accuracy(pred: np.ndarray) -> float:
        return float(np.mean(pred.argmax(-1) == y_te))

    print("training digits_mlp")
    mlp = build_mlp()
    train(mlp, x_tr, y_tr, epochs=20, from_logits=True)
    print("training digits_cnn")
    cnn = build_cnn()
    train(cnn, img_tr, y_tr, epochs=20, from_logits=False)
    print("training the Keras twin of digits_cnn_bn")
    twin = build_cnn_bn_twin()
    train(twin, img_tr, y_tr, epochs=12, from_logits=True)

    for name, model, x in (("digits_mlp", mlp, x_te), ("digits_cnn", cnn, img_te)):
        keras_path = HERE / f"{name}.keras"
        model.save(keras_path)
        ref = keras_predict(model, x)
        acc[f"{name}.keras"] = accuracy(ref)
        onnx_path = HERE / f"{name}.onnx"
        route = export_onnx(model, onnx_path)
        print(f"exported {onnx_path.name} via {route}")
        onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
        input_name = onnx.load(str(onnx_path)).graph.input[0].name
        got = ort_predict(onnx_path, {input_name: feeds[input_name]})
        check_same(f"{name}.onnx vs Keras", ref, got, atol=1e-4)
        acc[f"{name}.onnx"] = accuracy(got)
        # reload the .keras file: what ships must predict what we trained
        reloaded = keras.saving.load_model(keras_path)
        check_same(f"{name}.keras reloaded", ref, keras_predict(reloaded, x), atol=1e-6)

    path = HERE / "digits_cnn_bn.onnx"
    onnx.save(cnn_bn_to_onnx(twin), str(path))
    ref = keras_predict(twin, img_te)
    got = ort_predict(path, {"image_nchw": feeds["image_nchw"]})
    check_same("digits_cnn_bn.onnx vs its Keras twin", ref, got, atol=1e-4)
    acc["digits_cnn_bn.onnx"] = accuracy(got)
    acc["(Keras twin of digits_cnn_bn)"] = accuracy(ref)

    np.savez_compressed(HERE / "digits_test.npz", **feeds, labels=y_te)
    acc["digits_mlp_k2.h5"] = make_keras2_sample(x_tr, x_te, y_tr, y_te)

    print(f"\ntest split: {len(y_te)} images (train {len(y_tr)})")
    for name, a in acc.items():
        print(f"  {name:32s} accuracy {a:.4f}")
    for f in sorted(HERE.glob("digits_*")):
        size = f.stat().st_size
        print(f"  {f.name:32s} {size / 1024:7.1f} KiB")
        if size >= MAX_BYTES:
            raise SystemExit(f"{f.name} is {size} bytes; sample files must stay under 1 MB")


if __name__ == "__main__":
    main(sys.argv[1:] or None)
