"""The ONNX fold pass over a Keras model's ONNX export (Keras 3 and Keras 2 alike): the
export is folded with the ONNX backend and written, or moved into place unchanged where
that backend is not available."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnfuse.backend import FuseOptions, atomic_path

__all__ = ["fold_export"]


def _onnx_backend() -> Any:
    """The ONNX backend, or None where it is not available."""
    try:
        from bnfuse.onnx.backend import OnnxBackend
    except ImportError:
        return None
    return OnnxBackend()


def fold_export(tmp: Path, path: Path) -> list[str]:
    """Run the ONNX fold pass over an export at ``tmp`` and write it to ``path`` (or move
    it there unchanged where the ONNX backend is not available); returns notes."""
    notes: list[str] = []
    onnx_backend = _onnx_backend()
    if onnx_backend is None:
        notes.append("ONNX backend not available: the export was written without an ONNX fold pass")
        with atomic_path(path) as final:  # (which gives it the output's mode)
            os.replace(tmp, final)
        return notes
    ob = onnx_backend
    exported = ob.load(tmp)
    res = ob.fuse(exported, FuseOptions())
    if res.folds:
        notes.append(f"ONNX fold pass over the export folded {len(res.folds)} more node(s)")
    ob.save(res.model, path)
    return notes
