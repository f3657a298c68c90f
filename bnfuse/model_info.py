"""What a model file says about the format version and the tool that wrote it.

For the HTML report's summary: an ONNX file's IR version, opsets and producer, read from
the top-level protobuf fields without decoding the graph or its weights (so it costs
microseconds on a 100 MB model); a ``.keras`` archive's ``keras_version`` from its
``metadata.json``. Anything unreadable gives an empty description, never an error: the
report is about the fold, and the model was already loaded once by then.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from bnfuse.onnx.storage import read_header

__all__ = ["describe"]


def _onnx(path: Path) -> str:
    header = read_header(path)
    opsets = [f"{d} {v}" if d else f"opset {v}" for d, v in header.opsets]
    ir = f"IR {header.ir_version}" if header.ir_version is not None else ""
    parts = [ir, ", ".join(sorted(opsets, key=lambda s: not s.startswith("opset")))]
    if header.producer:
        parts.append(f"written by {header.producer}")
    return " · ".join(p for p in parts if p)


def _keras(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("metadata.json"))
    version = meta.get("keras_version")
    return f"saved by Keras {version}" if version else ""


def describe(source: str, backend: str) -> str:
    """``IR 8 · opset 15, ai.onnx.ml 2 · written by tf2onnx 1.17.0`` for an ONNX file,
    ``saved by Keras 3.15.1`` for a ``.keras`` archive; ``""`` when ``source`` is not a
    readable file of that kind."""
    path = Path(source)
    try:
        if not path.is_file():
            return ""
        if backend == "onnx":
            return _onnx(path)
        if path.suffix.lower() == ".keras":
            return _keras(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        # ValueError covers a damaged file's WireError, an empty file's mmap and bad JSON
        return ""
    return ""
