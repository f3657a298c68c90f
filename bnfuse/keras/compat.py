"""Keras 3 (``keras``) and Keras 2 (``tf_keras``) behind one small interface.

The two share layer names, weight layouts and the shape of a model's config, so the graph
editing (:mod:`bnfuse.keras.graph`), the rules (:mod:`bnfuse.keras.rules`) and the fold
pass (:mod:`bnfuse.keras.fuse`) are written once. What differs — the module to import,
how variables are named and copied, how a Functional model is recognised, Keras's
private scopes for safe mode and custom objects — lives here and nowhere else: this is
the only module that touches private Keras API.

A :class:`Flavor` is picked from a model object (:func:`flavor_of`) or from a version
number read from a file (:func:`flavor`). ``tf_keras`` is imported only when a Keras 2
model shows up; without it a :class:`~bnfuse.errors.MissingDependencyError` names the
extra to install.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bnfuse.errors import MissingDependencyError

__all__ = ["Flavor", "flavor", "flavor_of", "flavor_of_class", "is_keras_object"]


class Flavor:
    """One Keras major version: its module and the few operations that differ."""

    def __init__(self, version: int) -> None:
        self.version = version
        if version == 2:
            try:
                import tf_keras
            except ModuleNotFoundError as exc:
                raise _missing(exc, "tf-keras (Keras 2)") from None
            self.module: Any = tf_keras
            from tf_keras.src.engine import functional

            self._functional_mod = functional
            self.functional_cls: type = functional.Functional
            self.label = f"Keras 2 (tf_keras {tf_keras.__version__})"
        else:
            try:
                import keras
            except ModuleNotFoundError as exc:
                raise _missing(exc, "keras") from None
            self.module = keras
            self._functional_mod = None
            self.functional_cls = keras.src.models.functional.Functional
            self.label = f"Keras {keras.__version__}"
        self.layers: Any = self.module.layers
        self.sequential_cls: type = self.module.Sequential
        self.model_cls: Any = self.module.Model
        bn = [self.layers.BatchNormalization]
        if version == 2:
            # inference of a synchronized BN is the plain BN formula on moving statistics
            bn.append(self.layers.experimental.SyncBatchNormalization)
        self.bn_classes: tuple[type, ...] = tuple(bn)

    # -- classes ---------------------------------------------------------------------

    @functools.cache  # noqa: B019 (two flavors per process at most)
    def classes(self, names: tuple[str, ...]) -> tuple[type, ...]:
        """The layer classes named ``names`` (those this Keras has)."""
        return tuple(c for n in names if (c := getattr(self.layers, n, None)) is not None)

    def is_graph_model(self, obj: Any) -> bool:
        """A plain Functional or Sequential model (a graph bnfuse can edit)."""
        return type(obj) in (self.functional_cls, self.sequential_cls)

    def is_sequential(self, obj: Any) -> bool:
        return isinstance(obj, self.sequential_cls)

    def is_bn(self, layer: Any) -> bool:
        """Any BatchNormalization layer (subclasses included)."""
        base = self.layers.BatchNormalization
        if self.version == 2:
            from tf_keras.src.layers.normalization.batch_normalization import (
                BatchNormalizationBase,
            )

            base = BatchNormalizationBase
        return isinstance(layer, base)

    def is_plain_bn(self, layer: Any) -> bool:
        """A BN whose inference bnfuse knows exactly (not a user subclass)."""
        return type(layer) in self.bn_classes

    def bn_epsilon(self, layer: Any) -> float:
        """The epsilon the layer uses at inference: its own, also for a Keras 2 ``fused``
        BN (TensorFlow 2.21's inference kernel does not raise it to cuDNN's 1.001e-5;
        measured, see tests/keras/test_keras2_folds.py)."""
        return float(layer.epsilon)

    def bn_axis(self, layer: Any) -> Any:
        """The axis (or axes) of the BN's input that it normalizes over.

        Keras 2 shifts ``axis`` by one when built with ``virtual_batch_size`` (its
        parameters get an extra dimension), and writes the shifted axes into its config,
        which it then cannot rebuild from; this undoes that shift.
        """
        axis: Any = getattr(layer, "axis", -1)
        if self.version == 2 and getattr(layer, "virtual_batch_size", None) and layer.built:
            return [int(a) - 1 for a in axis]
        return axis

    def node_offset(self, layer: Any) -> int:
        """Where the config's node numbering of a nested model starts (Keras leaves out
        the node a model built on its own Input made)."""
        if self.version == 2:
            return 1 if self._functional_mod._should_skip_first_node(layer) else 0
        return 1 if isinstance(layer, self.functional_cls) else 0

    def flatten_channels_first(self, layer: Any) -> bool:
        return bool(getattr(layer, "_channels_first", False))

    # -- values ----------------------------------------------------------------------

    def to_numpy(self, value: Any) -> np.ndarray:
        if self.version == 2:
            return np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        return np.asarray(self.module.ops.convert_to_numpy(value))

    def dtype(self, value: Any) -> np.dtype[Any]:
        dt = value.dtype
        if self.version == 2:
            import tensorflow as tf

            return np.dtype(tf.as_dtype(dt).as_numpy_dtype)
        return np.dtype(self.module.backend.standardize_dtype(dt))

    def var_name(self, variable: Any, layer: Any = None) -> str:
        """A variable's own name as Keras 3 gives it (``kernel``); Keras 2 names it
        ``scope/layer/kernel:0``, and a DepthwiseConv's kernel ``depthwise_kernel``."""
        name = str(variable.name)
        if self.version == 2:
            name = name.rsplit("/", 1)[-1].split(":", 1)[0]
            if name == "depthwise_kernel" and type(layer).__name__.startswith("DepthwiseConv"):
                return "kernel"
        return name

    def flatten(self, struct: Any) -> list[Any]:
        if self.version == 2:
            import tensorflow as tf

            return list(tf.nest.flatten(struct))
        return list(self.module.tree.flatten(struct))

    def pack_inputs(self, model: Any, flat: list[Any]) -> Any:
        """``flat`` in the structure the model's call takes."""
        struct = getattr(model, "_nested_inputs" if self.version == 2 else "_inputs_struct", None)
        if struct is not None:
            try:
                if self.version == 2:
                    import tensorflow as tf

                    return tf.nest.pack_sequence_as(struct, flat)
                return self.module.tree.pack_sequence_as(struct, flat)
            except (TypeError, ValueError):
                pass
        return flat[0] if len(flat) == 1 else flat

    def input_names(self, model: Any) -> list[str]:
        """Names of the model's inputs (their InputLayer names), in ``model.inputs`` order."""
        names = []
        for i, t in enumerate(model.inputs):
            hist = getattr(t, "_keras_history", None)
            op = None
            if hist is not None:
                op = getattr(hist, "layer" if self.version == 2 else "operation", None)
            names.append(getattr(op, "name", None) or getattr(t, "name", None) or f"input_{i}")
        return names

    def input_signature(self, model: Any) -> Any:
        """Keras 3's export input signature of ``model`` (None where it cannot say)."""
        try:
            from keras.src.export.export_utils import get_input_signature

            return get_input_signature(model)
        except Exception:
            return None

    # -- layers and variables --------------------------------------------------------

    def flatten_layers(self, layer: Any, include_self: bool = True) -> list[Any]:
        return list(layer._flatten_layers(include_self=include_self))

    def copy_variables(self, old: Any, new: Any) -> None:
        """Copy every variable of layer ``old`` into its rebuilt twin ``new`` exactly."""
        olds = self.flatten_layers(old)
        news = self.flatten_layers(new)
        if len(olds) != len(news):
            raise ValueError(f"layer '{new.name}' changed structure when rebuilt")
        for o, n in zip(olds, news, strict=True):
            if self.version == 2:
                ow = o._trainable_weights + o._non_trainable_weights
                nw = n._trainable_weights + n._non_trainable_weights
                if len(ow) != len(nw):
                    raise ValueError(f"layer '{n.name}' changed its variables when rebuilt")
                for a, b in zip(ow, nw, strict=True):
                    b.assign(a)
                if ow and hasattr(n, "finalize_state"):
                    # an adapted preprocessing layer (Normalization) derives the tensors it
                    # computes with from its variables here, as tf_keras's loader does
                    n.finalize_state()
            else:
                store: dict[str, Any] = {}
                o.save_own_variables(store)
                n.load_own_variables(store)

    def registered_name(self, cls: type) -> str:
        return str(self.module.saving.get_registered_name(cls))

    @contextlib.contextmanager
    def rebuild_scope(self, custom_objects: dict[str, Any]) -> Iterator[None]:
        """Custom objects known and safe mode off: the model is already in memory, so
        rebuilding its Lambda layers from bnfuse's own copy of its config runs no code
        that is not already loaded."""
        if self.version == 2:
            from tf_keras.src.saving.serialization_lib import SafeModeScope
        else:
            from keras.src.saving.serialization_lib import SafeModeScope
        with self.module.saving.custom_object_scope(custom_objects), SafeModeScope(False):
            yield

    def count_params(self, weights: Sequence[Any]) -> int:
        """What ``model.summary()`` counts (each variable once)."""
        seen: dict[int, Any] = {id(w): w for w in weights}
        return int(sum(math.prod(int(d) for d in w.shape) for w in seen.values()))

    def builtin_module(self, module: str) -> bool:
        """Is ``module`` part of this Keras (not user code)?"""
        root = "tf_keras" if self.version == 2 else "keras"
        return module == root or module.startswith(root + ".")


def _missing(exc: ModuleNotFoundError, package: str) -> MissingDependencyError:
    """The extra to install for a failed Keras import (TensorFlow itself, or ``package``)."""
    root = (exc.name or "").split(".")[0]
    return MissingDependencyError("tensorflow" if root == "tensorflow" else package, "keras")


_FLAVORS: dict[int, Flavor] = {}


def flavor(version: int) -> Flavor:
    """The flavor for Keras ``version`` (2 or 3); imports its module on first use."""
    if version not in _FLAVORS:
        _FLAVORS[version] = Flavor(2 if version == 2 else 3)
    return _FLAVORS[version]


def _version_of_class(cls: type) -> int | None:
    for c in cls.__mro__:
        mod = c.__module__ or ""
        if mod == "tf_keras" or mod.startswith("tf_keras."):
            return 2
        if mod == "keras" or mod.startswith("keras."):
            return 3
    return None


def is_keras_object(obj: Any) -> bool:
    """Is ``obj`` an object of Keras 3 or Keras 2 (by its classes, imports nothing)?"""
    return _version_of_class(type(obj)) is not None


def flavor_of_class(cls: type) -> Flavor | None:
    """The flavor a class belongs to, or None for a class of neither Keras."""
    v = _version_of_class(cls)
    return None if v is None else flavor(v)


def flavor_of(obj: Any) -> Flavor:
    """The flavor of a Keras object (Keras 3 when it belongs to neither)."""
    return flavor_of_class(type(obj)) or flavor(3)
