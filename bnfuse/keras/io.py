"""Loading and saving Keras models, with Keras's safe deserialization kept on.

Every failure becomes a one-line :class:`~bnfuse.errors.ModelLoadError` (or
:class:`~bnfuse.errors.UnsupportedModelError` for a model that loads but cannot be
rewritten).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfuse.backend import atomic_path
from bnfuse.errors import (
    BnfuseError,
    MissingDependencyError,
    ModelLoadError,
    UnsupportedModelError,
    UsageError,
    first_line,
)
from bnfuse.keras.compat import flavor, flavor_of
from bnfuse.keras.detect import detect, stored_config
from bnfuse.keras.onnx_export import fold_export

__all__ = ["export_onnx", "load_model", "save_model"]

_UNSAFE_HINT = (
    "it runs arbitrary Python code when loaded, so bnfuse keeps Keras safe mode on; "
    "if you trust the file, pass --unsafe-load (unsafe_load=True)"
)


def _walk_layer_configs(cfg: Any) -> Iterator[dict[str, Any]]:
    if isinstance(cfg, dict):
        if "class_name" in cfg and isinstance(cfg.get("config"), dict):
            yield cfg
        for v in cfg.values():
            yield from _walk_layer_configs(v)
    elif isinstance(cfg, list):
        for v in cfg:
            yield from _walk_layer_configs(v)


def _lambda_names(cfg: Any) -> list[str]:
    return [
        str(c["config"].get("name", "?"))
        for c in _walk_layer_configs(cfg)
        if c.get("class_name") == "Lambda"
    ]


def _unknown_class(message: str) -> str | None:
    for pat in (
        r"Could not locate (?:class|function) '([^']+)'",
        r"Unknown (?:layer|object|class|activation)[^']*'([^']+)'",
        r"Unknown (?:layer|object): ([\w.]+)",
    ):
        m = re.search(pat, message)
        if m:
            return m.group(1)
    return None


def load_model(path: Path, *, unsafe_load: bool = False) -> Any:
    """Load a ``.keras`` / ``.h5`` model or a Keras 2 SavedModel directory, uncompiled,
    with the Keras that wrote it (see :mod:`bnfuse.keras.detect`)."""
    path = Path(path)
    mf = detect(path)
    cfg = stored_config(mf)  # read before anything is deserialized
    lambdas = _lambda_names(cfg)
    if lambdas and not unsafe_load:
        raise ModelLoadError(
            f"{path}: contains Lambda layer(s) {', '.join(repr(n) for n in lambdas[:3])}; "
            + _UNSAFE_HINT
        )
    if mf.version == 2:
        from bnfuse.keras import keras2_io

        return keras2_io.load(mf, unsafe_load=unsafe_load)
    for c in _walk_layer_configs(cfg):
        axis = c["config"].get("axis")
        if c.get("class_name") == "BatchNormalization" and isinstance(axis, list) and len(axis) > 1:
            raise ModelLoadError(
                f"{path}: BatchNormalization '{c['config'].get('name', '?')}' normalizes over "
                f"several axes {axis} (tf.keras 2); Keras 3 only supports a single BN axis, so "
                "it cannot load this model"
            )
    keras = flavor(3).module  # MissingDependencyError (exit 4) where Keras 3 is missing

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe_load)
    except BnfuseError:
        raise
    except Exception as exc:
        msg = str(exc)
        cls = _unknown_class(msg)
        if cls:
            registered = {
                str(c.get("registered_name"))
                for c in _walk_layer_configs(cfg)
                if c.get("class_name") == cls and c.get("registered_name") not in (None, cls)
            }
            label = f"'{cls}'"
            if registered:
                label += f" (registered as '{sorted(registered)[0]}')"
            raise ModelLoadError(
                f"{path}: unknown layer class {label}: the file uses a custom class this "
                "process does not know; import the code that defines it (registered with "
                "@keras.saving.register_keras_serializable) before loading"
            ) from None
        if "safe_mode" in msg or "lambda" in msg.lower():
            raise ModelLoadError(f"{path}: {first_line(exc)}; {_UNSAFE_HINT}") from None
        raise ModelLoadError(f"{path}: cannot load the Keras model: {first_line(exc)}") from None
    return model


def save_model(model: Any, path: Path) -> list[str]:
    """Write ``model`` to ``path`` (.keras, .h5 or .onnx; a Keras 2 model also a
    SavedModel directory) atomically, with the Keras it belongs to; returns notes."""
    path = Path(path)
    if flavor_of(model).version == 2:
        from bnfuse.keras import keras2_io

        return keras2_io.save(model, path)
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns that .h5 is a legacy format
            model.save(tmp)
        return []
    if suffix == ".onnx":
        return export_onnx(model, path)
    raise UsageError(f"{path}: a Keras model can be written as .keras, .h5 or .onnx")


def _input_signature(model: Any) -> Any:
    return flavor_of(model).input_signature(model)


def export_onnx(model: Any, path: Path) -> list[str]:
    """Export through Keras's own exporter (tf2onnx), then fold the export with the ONNX
    backend when it is available. Returns notes for the report."""
    try:
        import tf2onnx  # noqa: F401
    except ModuleNotFoundError:
        raise MissingDependencyError("tf2onnx", "keras") from None
    notes: list[str] = []
    policy = getattr(getattr(model, "dtype_policy", None), "name", "float32")
    fd, raw = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".export.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(raw)
    try:
        sig = _input_signature(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model.export(str(tmp), format="onnx", verbose=False, input_signature=sig)
            except Exception as exc:
                raise UnsupportedModelError(
                    f"ONNX export failed (Keras exporter / tf2onnx, dtype policy {policy}): "
                    f"{first_line(exc)}"
                ) from None
        return notes + fold_export(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
