"""The Keras backend: :class:`KerasBackend` implements :class:`bnfuse.backend.Backend`.

One backend for Keras 3 (``keras``) and Keras 2 (``tf_keras``): the Keras a model belongs
to is read from the model object or file (:mod:`bnfuse.keras.compat`,
:mod:`bnfuse.keras.detect`) and imported then; :mod:`bnfuse.api` imports this module
lazily, only for Keras models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnfuse.backend import BenchTarget, FuseOptions, PassResult, Runner
from bnfuse.keras import fuse as _fuse
from bnfuse.keras import io as _io
from bnfuse.keras import rules as _rules
from bnfuse.keras import runtime as _runtime
from bnfuse.keras.compat import flavor_of
from bnfuse.result import ModelStats

__all__ = ["KerasBackend"]


class KerasBackend:
    """Keras 3 and Keras 2 models: ``.keras`` / ``.h5`` files, Keras 2 SavedModel
    directories, or in-memory Functional/Sequential models of either Keras."""

    name = "keras"

    def __init__(self) -> None:
        #: notes from the last :meth:`save` (e.g. what the ONNX fold pass did to an export)
        self.save_notes: list[str] = []

    def load(self, path: Path, *, unsafe_load: bool = False) -> Any:
        """Read a ``.keras`` / ``.h5`` file or a Keras 2 SavedModel directory with the Keras
        that wrote it (Lambda layers refused unless ``unsafe_load``)."""
        return self.accept(_io.load_model(Path(path), unsafe_load=unsafe_load))

    def accept(self, model: Any) -> Any:
        """Check that ``model`` is a built Functional or Sequential ``keras.Model``."""
        _fuse.check_rewritable(model)
        return model

    def rule_names(self) -> tuple[str, ...]:
        """Every rule name, backward rules first."""
        return _rules.rule_names()

    def fuse(self, model: Any, options: FuseOptions) -> PassResult:
        """Fold every foldable BN into a rebuilt copy of ``model`` (never mutated)."""
        return _fuse.fuse(model, options)

    def framework(self, model: Any) -> str:
        """The Keras that holds the model: "Keras 3.15.1" or "Keras 2 (tf_keras 2.21.0)"."""
        return str(flavor_of(model).label)

    def stats(self, model: Any, path: Path | None = None) -> ModelStats:
        """Parameter counts as ``model.summary()`` shows them, layers, BN layers, file size."""
        return _runtime.model_stats(model, path)

    def runner(self, model: Any) -> Runner:
        """Runs ``model(x, training=False)``."""
        return _runtime.KerasRunner(model)

    def bench_targets(
        self, model: Any, threads: int, *, providers: Sequence[str] = ()
    ) -> list[BenchTarget]:
        """``keras tf.function`` and ``keras eager`` (``providers`` are onnxruntime's:
        the API refuses them for Keras models)."""
        return _runtime.bench_targets(model, threads)

    def save(self, model: Any, path: Path) -> None:
        """Write ``.keras`` / ``.h5`` (a Keras 2 model: also a SavedModel directory)
        atomically with the model's own Keras, or ``.onnx`` via tf2onnx."""
        self.save_notes = _io.save_model(model, Path(path))

    def complete(self, model: Any) -> Any:
        """``model`` itself: Keras models are complete objects."""
        return model
