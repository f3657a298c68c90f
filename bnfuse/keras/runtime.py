"""Running and timing Keras models: validation runner, benchmark targets, model stats."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnfuse.backend import BenchTarget, InputSpec
from bnfuse.keras.compat import flavor_of
from bnfuse.result import ModelStats

__all__ = ["KerasRunner", "bench_targets", "configure_threads", "model_stats"]


def _input_tensors(model: Any) -> list[Any]:
    return list(model.inputs)


def input_names(model: Any) -> list[str]:
    """Names of the model's inputs (their InputLayer names), in ``model.inputs`` order."""
    return flavor_of(model).input_names(model)


def output_names(model: Any) -> list[str]:
    """Names of the model's outputs (their producing layers), in ``model.outputs`` order."""
    names = getattr(model, "output_names", None)
    if names and len(names) == len(model.outputs):
        return [str(n) for n in names]
    out = []
    attr = "layer" if flavor_of(model).version == 2 else "operation"
    for i, t in enumerate(model.outputs):
        hist = getattr(t, "_keras_history", None)
        op = getattr(hist, attr, None) if hist is not None else None
        out.append(getattr(op, "name", None) or f"output_{i}")
    return out


def _pack(model: Any, flat: list[Any]) -> Any:
    return flavor_of(model).pack_inputs(model, flat)


def _to_numpy_of(model: Any) -> Any:
    fl = flavor_of(model)

    def to_numpy(out: Any) -> list[np.ndarray]:
        return [np.asarray(fl.to_numpy(o)) for o in fl.flatten(out)]

    return to_numpy


def _coarsest_compute_dtype(model: Any) -> str | None:
    from bnfuse.validate import coarsest_float

    try:  # Keras 3 and tf_keras both have it; a model without it is judged by its outputs
        layers = list(model._flatten_layers(include_self=False))
    except (AttributeError, TypeError):
        return None
    return coarsest_float(str(getattr(layer, "compute_dtype", None)) for layer in layers)


class KerasRunner:
    """``model(x, training=False)`` on the given feeds; outputs in ``model.outputs`` order."""

    runtime = "keras model(x, training=False)"

    def __init__(self, model: Any) -> None:
        self.model = model
        fl = flavor_of(model)
        if fl.version == 2:
            self.runtime = f"{fl.label} model(x, training=False)"
        self._to_numpy = _to_numpy_of(model)
        self._names = input_names(model)
        self._inputs = [
            InputSpec(
                name=n,
                dtype=fl.dtype(t),
                shape=tuple(None if d is None else int(d) for d in t.shape),
            )
            for n, t in zip(self._names, _input_tensors(model), strict=True)
        ]
        self._outputs = output_names(model)
        # mixed precision: float32 outputs of float16 layers (see bnfuse.validate)
        self.compute_dtype = _coarsest_compute_dtype(model)

    @property
    def inputs(self) -> Sequence[InputSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        flat = [np.asarray(feeds[n]) for n in self._names]
        return self._to_numpy(self.model(_pack(self.model, flat), training=False))


def configure_threads(threads: int) -> str:
    """Set TF's intra/inter-op thread pools if TF has not started them yet.

    Returns a note (empty when the setting took effect). TF fixes its pools on first use,
    so call this before loading a model to make ``--threads`` effective.
    """
    import tensorflow as tf

    th = tf.config.threading
    if (
        th.get_intra_op_parallelism_threads() == threads
        and th.get_inter_op_parallelism_threads() == threads
    ):
        return ""
    try:
        th.set_intra_op_parallelism_threads(threads)
        th.set_inter_op_parallelism_threads(threads)
        return ""
    except RuntimeError:
        intra = th.get_intra_op_parallelism_threads() or "TF default"
        inter = th.get_inter_op_parallelism_threads() or "TF default"
        return (
            "TensorFlow thread pools were already initialised "
            f"(intra-op: {intra}, inter-op: {inter}); threads={threads} not applied"
        )


def bench_targets(model: Any, threads: int) -> list[BenchTarget]:
    """``tf.function``-compiled call and plain eager call, both ``training=False``."""
    import tensorflow as tf

    note = configure_threads(threads)
    names = input_names(model)
    _to_numpy = _to_numpy_of(model)
    prefix = "keras" if flavor_of(model).version == 3 else "tf_keras"

    def prepare_function() -> Callable[[Mapping[str, np.ndarray]], Any]:
        # the first call traces (timed by the benchmark as the first run)
        # bnfuse's own packing runs as plain Python while tracing (autograph would
        # rewrite bnfuse's code, and needs not: it has no tensor-dependent control flow)
        pack = tf.autograph.experimental.do_not_convert(_pack)
        fn = tf.function(lambda *xs: model(pack(model, list(xs)), training=False))

        def call(feeds: Mapping[str, np.ndarray]) -> Any:
            return _to_numpy(fn(*[feeds[n] for n in names]))

        return call

    def prepare_eager() -> Callable[[Mapping[str, np.ndarray]], Any]:
        def call(feeds: Mapping[str, np.ndarray]) -> Any:
            flat = [feeds[n] for n in names]
            return _to_numpy(model(_pack(model, flat), training=False))

        return call

    return [
        BenchTarget(f"{prefix} tf.function", prepare_function, note),
        BenchTarget(f"{prefix} eager", prepare_eager, note),
    ]


def _count(weights: Sequence[Any]) -> int:
    # what keras.src.utils.summary_utils.count_params does for model.summary()
    return int(sum(math.prod(tuple(w.shape)) for w in weights))


def _leaf_layers(model: Any) -> list[Any]:
    from bnfuse.keras.fuse import is_graph_model

    fl = flavor_of(model)
    out = []
    for layer in model.layers:
        if isinstance(layer, fl.layers.InputLayer):
            continue
        if is_graph_model(layer):
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out


def model_stats(model: Any, path: Path | None = None) -> ModelStats:
    """Counts as ``model.summary()`` shows them; nodes = layers (nested models expanded)."""
    fl = flavor_of(model)
    if fl.version == 2:  # tf.keras's summary counts each variable once
        trainable = fl.count_params(model.trainable_weights)
        non_trainable = fl.count_params(model.non_trainable_weights)
    else:
        trainable = _count(model.trainable_weights)
        non_trainable = _count(model.non_trainable_weights)
    bns = sum(1 for layer in fl.flatten_layers(model, include_self=False) if fl.is_bn(layer))
    size = None
    if path is not None and Path(path).is_file():
        size = Path(path).stat().st_size
    elif path is not None and Path(path).is_dir():  # a SavedModel directory: every file in it
        size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return ModelStats(
        nodes=len(_leaf_layers(model)),
        bn_nodes=bns,
        params=trainable + non_trainable,
        trainable_params=trainable,
        non_trainable_params=non_trainable,
        file_size=size,
    )
