"""bnfuse: fold BatchNormalization into neighbouring Dense/Conv layers of Keras and ONNX models.

>>> import bnfuse
>>> result = bnfuse.fuse("model.onnx", "fused.onnx")   # doctest: +SKIP
>>> [(f.bn, f.into) for f in result.folds]              # doctest: +SKIP

Importing bnfuse imports neither tensorflow nor onnxruntime; backends load lazily. The
names below are imported on first use (``bnfuse.fuse`` imports numpy and the API), so
that ``bnfuse --help`` and a usage error answer before any of that is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bnfuse.api import benchmark, fuse
    from bnfuse.errors import (
        BnfuseError,
        FusionInvariantError,
        MissingDependencyError,
        ModelLoadError,
        UnsupportedModelError,
        UsageError,
        ValidationError,
    )
    from bnfuse.many import ModelRun, fuse_many
    from bnfuse.options import OptionError, Options
    from bnfuse.result import (
        BenchResult,
        BnStat,
        Fold,
        FuseResult,
        LatencyRow,
        LatencyStats,
        ModelStats,
        OutputMetrics,
        OutputShift,
        Recalibration,
        Refusal,
        Validation,
    )

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "benchmark": "bnfuse.api",
    "fuse": "bnfuse.api",
    "fuse_many": "bnfuse.many",
    "ModelRun": "bnfuse.many",
    "OptionError": "bnfuse.options",
    "Options": "bnfuse.options",
    **dict.fromkeys(
        (
            "BnfuseError",
            "FusionInvariantError",
            "MissingDependencyError",
            "ModelLoadError",
            "UnsupportedModelError",
            "UsageError",
            "ValidationError",
        ),
        "bnfuse.errors",
    ),
    **dict.fromkeys(
        (
            "BenchResult",
            "BnStat",
            "Fold",
            "FuseResult",
            "LatencyRow",
            "LatencyStats",
            "ModelStats",
            "OutputMetrics",
            "OutputShift",
            "Recalibration",
            "Refusal",
            "Validation",
        ),
        "bnfuse.result",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BenchResult",
    "BnStat",
    "BnfuseError",
    "Fold",
    "FuseResult",
    "FusionInvariantError",
    "LatencyRow",
    "LatencyStats",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelRun",
    "ModelStats",
    "OptionError",
    "Options",
    "OutputMetrics",
    "OutputShift",
    "Recalibration",
    "Refusal",
    "UnsupportedModelError",
    "UsageError",
    "Validation",
    "ValidationError",
    "__version__",
    "benchmark",
    "fuse",
    "fuse_many",
]
