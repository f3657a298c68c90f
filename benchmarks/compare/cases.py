"""The cases of the head-to-head (``benchmarks/run.py``): each prepares its ONNX and/or
``.keras`` files in a work folder and says which inputs to evaluate errors on.

Sample models are used as shipped; keras.applications are built with ``weights=None``,
randomized BN statistics and exported with ``model.export(format="onnx")``; the
hand-built graphs come from ``models.py``. Nothing is downloaded.
"""

from __future__ import annotations

import gc
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models as bench_models
import numpy as np
import onnx
from _common import ROOT
from _peers import quiet
from affine_vs_ort import randomize_bn

SAMPLES = ROOT / "sample_models"


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
