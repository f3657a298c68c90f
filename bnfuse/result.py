"""Typed, frozen results. The API returns these; the CLI and report only render them."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BenchResult",
    "BnStat",
    "Deferred",
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
]

Direction = Literal["backward", "forward"]


@dataclass(frozen=True)
class Fold:
    """One normalization folded away.

    ``bn`` is the BatchNormalization (or BN-equivalent affine) node/layer name, ``into``
    the linear node/layer that absorbed it, ``rule`` the rule that matched.
    """

    bn: str
    into: str
    rule: str
    direction: Direction
    channels: int
    kind: str = "BatchNormalization"
    detail: str = ""
    scope: str = ""  # "" for the main graph, else the subgraph / function / nested model path
    widening: float | None = None  # max|W'| / max|W| (with --check-stats / --recalibrate)
    scale_spread: float | None = None  # max|s| / min|s| of the per-channel scales applied


@dataclass(frozen=True)
class Refusal:
    """A normalization that was left in place, and why (one readable sentence)."""

    bn: str
    reason: str
    kind: str = "BatchNormalization"
    rule: str = ""
    scope: str = ""
    code: str = ""  # stable reason code, see bnfuse/reasons.py


@dataclass(frozen=True)
class ModelStats:
    """Size of a model. Trainable/non-trainable are Keras's terms (None when unknown)."""

    nodes: int
    bn_nodes: int
    params: int
    trainable_params: int | None = None
    non_trainable_params: int | None = None
    file_size: int | None = None


@dataclass(frozen=True)
class OutputMetrics:
    """Agreement of one output between the original and the fused model.

    Errors are computed in float64 over every sample. An element passes when
    ``|fused - ref| <= atol + rtol*|ref|`` (identical non-finite values pass; a non-finite
    value where the other side differs fails). ``max_rel_error`` is taken over elements with
    ``|ref| > atol`` (smaller ones are judged by the absolute term). ``inf`` means a
    non-finite mismatch; JSON writes non-finite numbers as null.
    """

    name: str
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    cosine_similarity: float
    top1_agreement: float | None
    min_atol: float  # the smallest atol that would have passed at the chosen rtol
    rtol: float
    atol: float
    passed: bool
    dtype: str = ""  # the reference output's dtype, e.g. "float32"
    shape: tuple[int, ...] = ()  # the reference output's shape (first sample)
    elements: int = 0  # elements compared, over all samples
    mismatches: int = 0  # elements outside tolerance
    reason: str = ""  # why the output failed ("" when it passed)
    fused_name: str = ""  # the fused model's name for this output, when it differs


@dataclass(frozen=True)
class Validation:
    """Original vs fused, same runtime, graph optimizations disabled on both sides."""

    passed: bool
    samples: int
    runtime: str
    outputs: tuple[OutputMetrics, ...]
    culprits: tuple[str, ...] = ()  # BN names whose folds bisection blamed
    rolled_back: tuple[str, ...] = ()
    input_source: str = "random"


@dataclass(frozen=True)
class LatencyStats:
    """Timing of one model variant in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    throughput: float  # samples per second at this batch size
    min_ms: float = 0.0


@dataclass(frozen=True)
class LatencyRow:
    """Original vs fused at one runtime setting and batch size (timed interleaved)."""

    runtime: str  # e.g. "onnxruntime ORT_DISABLE_ALL", "keras tf.function"
    batch: int
    original: LatencyStats
    fused: LatencyStats
    speedup: float  # median of paired original/fused ratios (>1: fused is faster)
    speedup_ci: tuple[float, float]  # bootstrap 95% CI of that median
    note: str = ""
    # every timed run in ms, in run order, for charts (the HTML report); not in the JSON
    original_ms: tuple[float, ...] = field(
        default=(), repr=False, compare=False, metadata={"serialize": False}
    )
    fused_ms: tuple[float, ...] = field(
        default=(), repr=False, compare=False, metadata={"serialize": False}
    )


@dataclass(frozen=True)
class BenchResult:
    """Latency before/after plus one-off costs and the machine it ran on."""

    rows: tuple[LatencyRow, ...]
    setup_ms: dict[str, float]  # session creation / trace time, keyed "original ..." etc.
    first_run_ms: dict[str, float]
    threads: int
    machine: dict[str, Any]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0  # the time budget of the interleaved loops, all rows together
    providers: tuple[str, ...] = ()  # onnxruntime execution providers timed (ONNX models)


@dataclass(frozen=True)
class BnStat:
    """One BN's statistics against the data (``--check-stats``), see :mod:`bnfuse.stats`.

    ``mean_shift``/``var_ratio`` are None without data (or for a BN not checked); with
    ``--recalibrate`` they compare the data with the ORIGINAL moving statistics.
    """

    bn: str
    flag: str  # ok, drift, default, tiny-variance, invalid, no-stats, not-checked
    mean_shift: float | None = None
    var_ratio: float | None = None
    max_scale: float | None = None  # max |gamma| / sqrt(var + eps) of the original
    channels: int = 0
    samples: int = 0  # values per channel the data statistics came from
    kind: str = "BatchNormalization"
    scope: str = ""
    recalibrated: bool = False
    note: str = ""


@dataclass(frozen=True)
class OutputShift:
    """How far one output moved from the original model's after ``--recalibrate``."""

    name: str
    max_abs: float
    max_rel: float
    top1_agreement: float | None = None


@dataclass(frozen=True)
class Recalibration:
    """What ``--recalibrate`` did: the BNs given new moving statistics (population mean
    and variance of the data), in how many upstream-first waves, and the output shift."""

    bns: tuple[str, ...]
    waves: int
    runs: int  # model runs (feeds) per wave
    outputs: tuple[OutputShift, ...] = ()


class _Encoder:
    @staticmethod
    def encode(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                f.name: _Encoder.encode(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if f.metadata.get("serialize", True)
            }
        if isinstance(obj, enum.Enum):
            return obj.value
        if isinstance(obj, dict):
            return {str(k): _Encoder.encode(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [_Encoder.encode(v) for v in obj]
        if isinstance(obj, float) and obj != obj:  # NaN is not JSON
            return None
        return obj


class Deferred:
    """A value made by ``make()`` on first use, then kept."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make: Callable[[], Any] | None = make
        self._value: Any = None

    def get(self) -> Any:
        """The value (made now if it was not yet)."""
        if self._make is not None:
            self._value = self._make()
            self._make = None
        return self._value


class _ModelSlot:
    """Descriptor for ``FuseResult.model``: a :class:`Deferred` stored there is resolved
    on first read, so the fused ONNX model's weights are copied into its ModelProto only
    when someone asks for the model (the CLI and ``output=`` never do)."""

    _key = "_model_value"

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return None  # the dataclass default
        value = obj.__dict__.get(self._key)
        if isinstance(value, Deferred):
            value = value.get()
            obj.__dict__[self._key] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._key] = None if value is self else value


@dataclass(frozen=True)
class FuseResult:
    """Everything one fusion run produced.

    ``model`` is the fused model (an ``onnx.ModelProto`` or a ``keras.Model``), made on
    first access; it is not part of :meth:`to_dict`.
    """

    backend: Literal["onnx", "keras"]
    source: str
    folds: tuple[Fold, ...]
    refusals: tuple[Refusal, ...]
    before: ModelStats
    after: ModelStats
    model: Any = field(
        default=_ModelSlot(), repr=False, compare=False, metadata={"serialize": False}
    )
    output_path: str | None = None
    written: bool = False
    dry_run: bool = False
    validation: Validation | None = None
    bench: BenchResult | None = None
    bnfuse_version: str = ""
    warnings: tuple[str, ...] = ()
    bn_stats: tuple[BnStat, ...] = ()  # --check-stats / --recalibrate, worst first
    recalibration: Recalibration | None = None
    #: the model's format and the framework that wrote it, e.g. "Keras 2 (tf_keras
    #: 2.21.0)", "Keras 3.15.1", "ONNX opset 13, IR 8 (tf2onnx 1.17.0)"
    framework: str = ""

    @property
    def ok(self) -> bool:
        """True unless validation ran and failed."""
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable keys (schema ``bnfuse.result/1``, see docs/report-schema.md)."""
        d: dict[str, Any] = {"schema": "bnfuse.result/1"}
        d.update(_Encoder.encode(self))
        return d
