"""bnfuse: fold BatchNormalization into neighbouring Dense/Conv layers of Keras and ONNX models.

>>> import bnfuse
>>> result = bnfuse.fuse("model.onnx", "fused.onnx")   # doctest: +SKIP
>>> [(f.bn, f.into) for f in result.folds]              # doctest: +SKIP

Importing bnfuse imports neither tensorflow nor onnxruntime; backends load lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    "ModelStats",
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
]
