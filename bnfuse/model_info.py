"""What a model file says about the format version and the tool that wrote it.

For the HTML report's summary: an ONNX file's IR version, opsets and producer, read from
the top-level protobuf fields without decoding the graph or its weights (so it costs
microseconds on a 100 MB model); a ``.keras`` archive's ``keras_version`` from its
``metadata.json``. Anything unreadable gives an empty description, never an error: the
report is about the fold, and the model was already loaded once by then.
"""

from __future__ import annotations

import json
import mmap
import zipfile
from pathlib import Path

from bnfuse.onnx import wire

__all__ = ["describe"]

# ModelProto fields (onnx.proto): ir_version = 1, producer_name = 2,
# producer_version = 3, opset_import = 8; OperatorSetIdProto: domain = 1, version = 2
_IR, _PRODUCER, _PRODUCER_VERSION, _OPSET = 1, 2, 3, 8


def _text(buf: mmap.mmap, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", "replace")


def _onnx(path: Path) -> str:
    ir, producer, opsets = "", "", []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, wire_type, _, start, end in wire.fields(buf, 0, len(buf)):
            if number == _IR and wire_type == 0:
                ir = f"IR {start}"
            elif number == _PRODUCER and wire_type == 2:
                producer = (_text(buf, start, end) + " " + producer).strip()
            elif number == _PRODUCER_VERSION and wire_type == 2:
                producer = (producer + " " + _text(buf, start, end)).strip()
            elif number == _OPSET and wire_type == 2:
                domain, version = "", 0
                for n, wt, _, a, b in wire.fields(buf, start, end):
                    if n == 1 and wt == 2:
                        domain = _text(buf, a, b)
                    elif n == 2 and wt == 0:
                        version = a
                opsets.append(f"{domain} {version}" if domain else f"opset {version}")
    parts = [ir, ", ".join(sorted(opsets, key=lambda s: not s.startswith("opset")))]
    if producer:
        parts.append(f"written by {producer}")
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
        # ValueError covers wire.WireError, an empty file's mmap and bad JSON
        return ""
    return ""
