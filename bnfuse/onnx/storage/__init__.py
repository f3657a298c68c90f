"""ONNX storage: everything between a model file and the in-memory model bnfuse folds.

The rest of bnfuse uses only the names exported here:

* files: :class:`ModelFiles` (``load`` / ``accept`` / ``save`` / ``size``),
  :class:`OnnxModel` (a ModelProto, the store of its large weights, the file it came
  from), :func:`session_source` (what onnxruntime loads), :func:`complete`,
  :func:`read_header`, :func:`model_bytes`;
* tensors: :class:`Payloads` (the data of placeholder tensors, left in the mapped input
  file until a fold reads or overwrites them), :func:`is_placeholder`, :func:`raw_dtype`,
  :func:`iter_tensors`, :func:`lazy_copy`, :func:`materialize`, :func:`skeleton`.

Inside, :mod:`.wire` cuts protobuf bytes, :mod:`.payloads` keeps placeholders,
:mod:`.external` checks, maps and writes external data, :mod:`.serialize` writes a message
in pieces, and :mod:`.files` puts them together. ``tests/test_import_graph.py`` checks that
no bnfuse module outside this package imports those submodules.
"""

from __future__ import annotations

from bnfuse.onnx.storage.external import (
    DATA_FIELDS,
    INLINE_LIMIT,
    has_large_payloads,
    iter_tensors,
    lazy_copy,
    materialize,
    skeleton,
)
from bnfuse.onnx.storage.files import (
    Header,
    ModelFiles,
    OnnxModel,
    TempModelFile,
    complete,
    model_bytes,
    read_header,
    session_source,
    wrap,
)
from bnfuse.onnx.storage.payloads import Payloads, is_placeholder, raw_dtype

__all__ = [
    "DATA_FIELDS",
    "INLINE_LIMIT",
    "Header",
    "ModelFiles",
    "OnnxModel",
    "Payloads",
    "TempModelFile",
    "complete",
    "has_large_payloads",
    "is_placeholder",
    "iter_tensors",
    "lazy_copy",
    "materialize",
    "model_bytes",
    "raw_dtype",
    "read_header",
    "session_source",
    "skeleton",
    "wrap",
]
