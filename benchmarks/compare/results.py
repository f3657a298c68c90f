"""What the head-to-head measures, as JSON-ready dataclasses: per tool, per ONNX model,
per Keras model and per case; and the limit above which an output is wrong."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
#: an output whose error exceeds this (relative to max(1, max|reference|)) is wrong
WRONG_REL = 1e-3


@dataclass
class Lat:
    median_ms: float
    p90_ms: float
    vs_original: float  # median of paired original/variant ratios (> 1: faster)
    runs: int
    vs_bnfuse: float | None = None  # median of paired bnfuse/variant ratios (> 1: faster)
    vs_original_ci: tuple[float, float] | None = None  # bootstrap 95% CIs of those medians
    vs_bnfuse_ci: tuple[float, float] | None = None
    blocks_vs_original: list[float] | None = None  # the paired ratio of each session block
    blocks_vs_bnfuse: list[float] | None = None


@dataclass
class ToolResult:
    tool: str
    failed: str = ""  # "" or the one-line reason the tool raised
    fold_s: list[float] = field(default_factory=list)
    bn: int | None = None
    affine: int | None = None
    nodes: int | None = None
    err_abs: float | None = None
    err_rel: float | None = None
    err_failed: str = ""
    wrong_above: float | None = None  # see wrong_limit()
    latency: dict[str, Lat] = field(default_factory=dict)
    latency_failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def wrong(self) -> bool:
        """The output does not compute the original's function (or cannot be run)."""
        if self.err_failed:
            return True
        if self.err_abs is None or self.wrong_above is None:
            return False
        return not self.err_abs <= self.wrong_above

    @property
    def valid(self) -> bool:
        return self.ok and not self.wrong

    @property
    def left(self) -> int | None:
        return None if self.bn is None or self.affine is None else self.bn + self.affine

    @property
    def fold_ms(self) -> float | None:
        return 1000 * statistics.median(self.fold_s) if self.fold_s else None


@dataclass
class OnnxResult:
    file: str
    size_mb: float
    nodes: int
    bn: int
    affine: int
    error_inputs: dict[str, list[int]]
    reference: str
    reference_note: str
    ref_max_abs: float
    err_original_abs: float
    err_original_rel: float
    latency_original: dict[str, Lat] = field(default_factory=dict)
    tools: dict[str, ToolResult] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)  # rule (direction) -> count
    refusals: list[str] = field(default_factory=list)
    strict_kinds: list[str] = field(default_factory=list)  # why strictly fewer is expected


@dataclass
class KerasResult:
    file: str
    size_mb: float
    bns_before: int
    bns_after: int
    fold_s: list[float]
    folds: dict[str, int]
    refusals: list[str]
    err_original_abs: float | None = None
    err_fused_abs: float | None = None
    err_note: str = ""
    tf_original_ms: float | None = None
    tf_fused_ms: float | None = None
    tf_speedup: float | None = None
    tf_speedup_ci: tuple[float, float] | None = None
    tf_runs: int = 0
    tf_failed: str = ""

    @property
    def fold_ms(self) -> float:
        return 1000 * statistics.median(self.fold_s)


@dataclass
class CaseResult:
    name: str
    group: str
    doc: str
    notes: list[str]
    onnx: OnnxResult | None = None
    keras: KerasResult | None = None
    seconds: float = 0.0


def wrong_limit(scale: float, err_original: float) -> float:
    """An output is wrong above this max abs error: WRONG_REL * max(1, max|reference|), or
    10x the unfused original's own float32 error when that is larger (an ill-conditioned
    model, where float32 itself is that far from float64)."""
    return max(WRONG_REL * scale, 10 * err_original)
