"""Loading and saving Keras 2 (``tf_keras``) models in the format they came in.

A user on TensorFlow 2.x deploys with tf.keras: a Keras 3 file would not load there. So a
Keras 2 model is written back by ``tf_keras`` itself: ``.h5`` as HDF5, ``.keras`` as the
Keras 2 zip, and a path without a suffix (or an existing SavedModel directory) as a
SavedModel directory. Directory outputs are written beside the destination and renamed
into place, so they appear whole or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
from bnfuse.keras.compat import flavor
from bnfuse.keras.detect import ModelFile, is_savedmodel_dir
from bnfuse.keras.onnx_export import fold_export

__all__ = ["atomic_dir", "export_onnx", "load", "save"]


def load(mf: ModelFile, *, unsafe_load: bool = False) -> Any:
    """Load a Keras 2 model with ``tf_keras`` (uncompiled)."""
    tfk = flavor(2).module
    kwargs: dict[str, Any] = {"compile": False}
    if mf.format == "keras":
        kwargs["safe_mode"] = not unsafe_load
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tfk.models.load_model(str(mf.path), **kwargs)
    except BnfuseError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{mf.path}: cannot load the Keras 2 (tf_keras) model: {first_line(exc)}"
        ) from None


def _format_for(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return "h5"
    if suffix == ".keras":
        return "keras"
    if suffix == "" or is_savedmodel_dir(path):
        return "tf"
    raise UsageError(
        f"{path}: a Keras 2 model can be written as .h5, .keras, .onnx or a SavedModel "
        "directory (a path without a suffix)"
    )


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; on success it replaces
    ``dest`` (an existing directory is moved aside first and removed after), on any
    exception it is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".bnfuse-tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".bnfuse-old", dir=dest.parent)
            )
            os.rename(dest, old / "x")
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old / "x", dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    # read from /proc where possible: setting the umask to read it races with threads
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextmanager
def _quiet_tf_log() -> Iterator[None]:
    """tf_keras's HDF5 writer logs a warning about compiled metrics for every uncompiled
    model (it tries to build them and fails): noise for a model bnfuse never compiles."""
    import logging

    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save(model: Any, path: Path) -> list[str]:
    """Write a Keras 2 model to ``path`` in the format its suffix names; returns notes."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return export_onnx(model, path)
    fmt = _format_for(path)
    with warnings.catch_warnings(), _quiet_tf_log():
        warnings.simplefilter("ignore")  # tf_keras warns that .h5 is a legacy format
        if fmt == "tf":
            with atomic_dir(path) as tmp:
                model.save(str(tmp), save_format="tf", include_optimizer=False)
        else:
            extra = {"include_optimizer": False} if fmt == "h5" else {}
            with atomic_path(path) as tmp:
                model.save(str(tmp), save_format=fmt, **extra)
    return []


def export_onnx(model: Any, path: Path) -> list[str]:
    """Export through tf2onnx (``model(x, training=False)`` traced), then fold the export
    with the ONNX backend, as for Keras 3."""
    try:
        import tf2onnx
    except ModuleNotFoundError:
        raise MissingDependencyError("tf2onnx", "keras") from None
    import tensorflow as tf

    fl = flavor(2)
    names = fl.input_names(model)
    sig = [
        tf.TensorSpec(tuple(t.shape), t.dtype, name=n)
        for n, t in zip(names, model.inputs, strict=True)
    ]

    pack = tf.autograph.experimental.do_not_convert(fl.pack_inputs)

    @tf.function(input_signature=sig)
    def call(*xs: Any) -> Any:
        return model(pack(model, list(xs)), training=False)

    fd, raw = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".export.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tf2onnx.convert.from_function(call, input_signature=sig, output_path=str(tmp))
            except Exception as exc:
                raise UnsupportedModelError(
                    f"ONNX export failed (tf2onnx): {first_line(exc)}"
                ) from None
        return fold_export(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
