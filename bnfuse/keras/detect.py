"""Which Keras wrote a model file, read from the file itself, and its stored configuration.

Keras 3 (``keras``) and Keras 2 (``tf_keras``, the ``tf.keras`` of TensorFlow <= 2.15)
write the same formats with different contents, and each loads only its own. The file
says which: ``keras_version`` in an HDF5 file's attributes or in a ``.keras`` zip's
``metadata.json``; a SavedModel directory is a Keras 2 model when it holds
``keras_metadata.pb`` (Keras 3 writes no such file; a SavedModel without it is a plain
``tf.Module``, not a Keras model). Never guessed from load errors.

This module imports no framework (``h5py`` only for ``.h5``), so bad input is refused
before TensorFlow starts; :func:`stored_config` gives the stored layer configuration for
the Lambda check that must happen before anything is deserialized.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfuse.errors import MissingDependencyError, ModelLoadError, first_line

__all__ = ["KERAS_FILE_SUFFIXES", "ModelFile", "detect", "is_savedmodel_dir", "stored_config"]

KERAS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVEDMODEL_METADATA = "keras_metadata.pb"


@dataclass(frozen=True)
class ModelFile:
    """A Keras model on disk: its path, format and the Keras major version that wrote it."""

    path: Path
    format: str  # "keras" (zip), "h5" or "savedmodel" (a directory)
    version: int  # 2 (tf_keras) or 3 (keras)
    keras_version: str  # as stored ("" when the file does not say)


def is_savedmodel_dir(path: Path) -> bool:
    """A directory holding a TensorFlow SavedModel."""
    p = Path(path)
    return p.is_dir() and ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file())


def _major(version: str, default: int) -> int:
    head = version.strip().split(".", 1)[0]
    return int(head) if head.isdigit() else default


def _h5_attrs(path: Path) -> dict[str, Any]:
    try:
        import h5py
    except ModuleNotFoundError:
        raise MissingDependencyError("h5py", "keras") from None
    try:
        with h5py.File(path, "r") as f:
            out = {}
            for key in ("keras_version", "model_config"):
                val = f.attrs.get(key)
                if val is not None:
                    out[key] = val.decode("utf-8") if isinstance(val, bytes) else str(val)
            return out
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: not a readable HDF5 model (truncated or corrupt?): {first_line(exc)}"
        ) from None


def _zip_member(path: Path, name: str) -> bytes | None:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a .keras file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            if name not in zf.namelist():
                return None
            return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(f"{path}: damaged .keras archive: {first_line(exc)}") from None


def detect(path: Path) -> ModelFile:
    """Format and Keras version of the model at ``path`` (raises ModelLoadError)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        if not is_savedmodel_dir(path):
            raise ModelLoadError(
                f"{path}: is a directory but not a SavedModel (no saved_model.pb inside)"
            )
        if not (path / SAVEDMODEL_METADATA).is_file():
            raise ModelLoadError(
                f"{path}: SavedModel without Keras metadata ({SAVEDMODEL_METADATA}): not a "
                "Keras model (a plain tf.Module or an exported inference graph); bnfuse "
                "needs the Keras layers, save it with model.save() from tf.keras"
            )
        if not (path / "variables").is_dir():
            raise ModelLoadError(
                f"{path}: SavedModel directory without its variables/ folder (incomplete copy?)"
            )
        return ModelFile(path, "savedmodel", 2, "")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        raw = _zip_member(path, "metadata.json")
        version = ""
        if raw is not None:
            try:
                version = str(json.loads(raw).get("keras_version", ""))
            except (ValueError, AttributeError):
                raise ModelLoadError(f"{path}: metadata.json is not valid JSON") from None
        return ModelFile(path, "keras", _major(version, 3), version)
    if suffix in (".h5", ".hdf5"):
        version = _h5_attrs(path).get("keras_version", "")
        return ModelFile(path, "h5", _major(version, 3), version)
    raise ModelLoadError(f"{path}: not a Keras model (.keras, .h5 or a SavedModel directory)")


def _savedmodel_config(path: Path) -> list[Any]:
    """The layer configs in a SavedModel's ``keras_metadata.pb`` (one JSON per object)."""
    try:
        from tf_keras.protobuf import saved_metadata_pb2
    except ModuleNotFoundError:
        raise MissingDependencyError("tf-keras (Keras 2)", "keras") from None
    meta = saved_metadata_pb2.SavedMetadata()
    try:
        meta.ParseFromString((path / SAVEDMODEL_METADATA).read_bytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(
            f"{path}: unreadable {SAVEDMODEL_METADATA}: {first_line(exc)}"
        ) from None
    out = []
    for node in meta.nodes:
        try:
            out.append(json.loads(node.metadata))
        except ValueError:
            continue
    return out


def stored_config(mf: ModelFile) -> Any:
    """The model configuration stored in the file, without deserializing anything."""
    path = mf.path
    if mf.format == "savedmodel":
        return _savedmodel_config(path)
    if mf.format == "keras":
        raw = _zip_member(path, "config.json")
        if raw is None:
            raise ModelLoadError(
                f"{path}: zip archive without a Keras model (no config.json inside)"
            )
        try:
            return json.loads(raw)
        except ValueError:
            raise ModelLoadError(f"{path}: config.json is not valid JSON") from None
    text = _h5_attrs(path).get("model_config")
    if text is None:
        raise ModelLoadError(f"{path}: HDF5 file without a model config (a weights-only file?)")
    try:
        return json.loads(text)
    except ValueError:
        raise ModelLoadError(f"{path}: model config is not valid JSON") from None
