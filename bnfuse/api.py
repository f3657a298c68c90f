"""The Python API: :func:`fuse` and :func:`benchmark`.

Pipeline: load -> fuse (plan + apply) -> validate (bisect / roll back on failure)
-> bench (optional) -> write atomically -> :class:`~bnfuse.result.FuseResult`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from bnfuse import __version__
from bnfuse import providers as _providers
from bnfuse.backend import Backend, FuseOptions, InputSpec, PassResult, Runner
from bnfuse.errors import (
    FusionInvariantError,
    MissingDependencyError,
    ModelLoadError,
    UsageError,
    ValidationError,
)
from bnfuse.options import OptionError, Options
from bnfuse.result import BenchResult, Deferred, Fold, FuseResult, Validation

__all__ = ["Progress", "benchmark", "fuse", "get_backend"]

ONNX_SUFFIXES = (".onnx",)
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")

#: ``progress(description, completed, total)``; total None means indeterminate.
Progress = Callable[[str, float, float | None], None]


def _load_backend(name: str) -> Backend:
    if name == "onnx":
        from bnfuse.onnx.backend import OnnxBackend

        return OnnxBackend()
    try:
        mod = importlib.import_module("bnfuse.keras.backend")
    except ModuleNotFoundError as exc:  # tensorflow / keras missing
        missing = (exc.name or "tensorflow").split(".")[0]
        if missing in ("tensorflow", "keras", "tf2onnx", "h5py"):
            raise MissingDependencyError(missing, "keras") from None
        raise
    backend: Backend = mod.KerasBackend()
    return backend


def get_backend(model: Any) -> tuple[Backend, Path | None]:
    """The backend for a path or model object, and the path (None for objects)."""
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix in ONNX_SUFFIXES:
            return _load_backend("onnx"), path
        if suffix in KERAS_SUFFIXES:
            from bnfuse.sniff import check_keras_file

            check_keras_file(path)  # before TensorFlow is imported (seconds)
            return _load_backend("keras"), path
        if path.is_dir():  # a SavedModel directory (the Keras backend says if it is not one)
            return _load_backend("keras"), path
        raise ModelLoadError(
            f"{path}: unknown model format {suffix or '(no extension)'!r}; "
            "expected .onnx, .keras, .h5 or a SavedModel directory"
        )
    cls = type(model)
    if cls.__module__.startswith("onnx") and cls.__name__ == "ModelProto":
        return _load_backend("onnx"), None
    if any(c.__module__.startswith(("keras", "tf_keras")) for c in cls.__mro__):
        return _load_backend("keras"), None
    raise UsageError(
        f"cannot fuse a {cls.__name__}: pass a path, an onnx.ModelProto or a keras.Model"
    )


def _same_file(a: Path, b: Path) -> bool:
    """True when writing ``a`` would replace ``b``: the same path after symbolic links
    are followed (an ``a`` that does not exist yet cannot be ``b``; a hard link is its
    own directory entry, which the atomic rename replaces, leaving ``b`` alone)."""
    return os.path.lexists(a) and a.resolve() == b.resolve()


def _check_output_path(src: Path | None, output: Path, backend: Backend) -> None:
    if src is not None and _same_file(output, src):
        raise UsageError(f"{output}: output would overwrite the input model; choose another path")
    if not output.parent.exists():
        raise UsageError(f"{output}: output directory {output.parent} does not exist")
    if output.is_dir() and not (output / "saved_model.pb").is_file():  # SavedModel: replaced
        raise UsageError(f"{output}: is a directory")


class _Recorded:
    """The reference side of validation: the original's outputs on every feed, computed
    once, after which its runner (an onnxruntime session holding another copy of the
    weights) can be released before the fused model's runner is built."""

    def __init__(self, runner: Runner, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        from bnfuse.validate import run_side

        self._inputs = list(runner.inputs)
        self._names = list(runner.output_names)
        self.runtime = str(getattr(runner, "runtime", "unknown"))
        self.compute_dtype: str | None = getattr(runner, "compute_dtype", None)
        self._outs = {id(f): run_side(runner, f, fused=False) for f in feeds}

    @property
    def inputs(self) -> Sequence[InputSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._names

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._outs[id(feeds)]
        except KeyError:
            raise FusionInvariantError("validation ran a feed that was not recorded") from None


@dataclass
class _Ctx:
    """What validation, bisection and rollback share: one reference runner, one set of feeds."""

    backend: Backend
    original: Any
    reference: Runner  # the original's recorded outputs, reused by every validation
    options: FuseOptions
    feeds: list[dict[str, np.ndarray]]
    rtol: float | None
    atol: float | None
    input_source: str
    all_folds: tuple[Fold, ...]

    def fused(self, exclude: frozenset[str]) -> PassResult:
        return self.backend.fuse(
            self.original, dataclasses.replace(self.options, exclude=self.options.exclude | exclude)
        )

    def validate(self, model: Any) -> Validation:
        import bnfuse.validate as _validate

        return _validate.compare(
            self.reference,
            self.backend.runner(model),
            self.feeds,
            rtol=self.rtol,
            atol=self.atol,
            input_source=self.input_source,
        )

    def passes_with(self, folds: Sequence[Fold]) -> bool:
        """Does the model with exactly these folds (the rest excluded) validate?"""
        keep = {f.bn for f in folds}
        res = self.fused(frozenset({f.bn for f in self.all_folds} - keep))
        return self.validate(res.model).passed


def bisect_culprits(
    folds: Sequence[Fold], passes_with: Callable[[Sequence[Fold]], bool], limit: int = 16
) -> list[Fold]:
    """Folds responsible for a validation failure.

    Repeatedly finds the shortest prefix of ``folds`` (minus culprits found so far) that
    fails; its last fold is a culprit. Each culprit costs O(log n) validations.
    """
    culprits: list[Fold] = []
    remaining = list(folds)
    while remaining and len(culprits) < limit:
        if passes_with(remaining):
            break
        lo, hi = 1, len(remaining)  # the prefix of length hi fails
        while lo < hi:
            mid = (lo + hi) // 2
            if passes_with(remaining[:mid]):
                lo = mid + 1
            else:
                hi = mid
        culprit = remaining[hi - 1]
        culprits.append(culprit)
        remaining.remove(culprit)
    return culprits


def fuse(
    model: Any,
    output: str | os.PathLike[str] | None = None,
    *,
    validate: bool = True,
    samples: int = 8,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | Sequence[Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rollback: bool = False,
    force: bool = False,
    dry_run: bool = False,
    skip: Sequence[str] = (),
    forward: bool = True,
    treat_initializer_inputs_as_constants: bool = False,
    unsafe_load: bool = False,
    bench: bool = False,
    batches: Sequence[int] = (1,),
    threads: int = 1,
    bench_seconds: float = 10.0,
    keep: Sequence[str] = (),
    reports: Sequence[str | os.PathLike[str]] = (),
    options: Options | None = None,
    progress: Progress | None = None,
    check_stats: bool = False,
    recalibrate: bool = False,
    providers: Sequence[str] = (),
) -> FuseResult:
    """Fold every BatchNormalization of ``model`` into a neighbouring linear layer.

    The settings come either as keyword arguments or as one :class:`~bnfuse.options.Options`
    (``options=``; then the keywords must keep their defaults). Every value is checked
    before the model is read; a bad one raises :class:`~bnfuse.options.OptionError` (a
    ``UsageError``) naming the parameter.

    Args:
        model: a path (``.onnx``, ``.keras``, ``.h5``), an ``onnx.ModelProto`` or a
            ``keras.Model``. It is never modified.
        output: where to write the fused model (written atomically, only after
            validation passed unless ``force``). For a Keras model, a ``.onnx`` output
            exports through Keras's own exporter and folds the export too.
        validate: compare original and fused outputs (onnxruntime with graph
            optimizations disabled, or Keras ``model(x, training=False)``).
        samples, seed: random validation inputs (ignored for dims given by ``inputs``).
        rtol, atol: tolerance; ``None`` picks defaults suited to the output dtype.
        inputs: real validation data, an ``.npz`` path or a name->array mapping.
        input_shapes: concrete shapes for inputs with symbolic dims.
        rollback: on validation failure, undo the responsible folds and keep the rest.
        force: write the model even when validation failed.
        dry_run: plan and report only; write nothing.
        skip: rule names to disable.
        forward: allow folding a BN forward into the layer after it.
        treat_initializer_inputs_as_constants: ONNX initializers also listed as graph
            inputs count as constants (they are overridable otherwise, so refused).
        unsafe_load: allow Keras models with ``Lambda`` layers (runs their code).
        bench: measure latency before/after (see :func:`benchmark`); skipped, with a
            warning, when validation failed and the model will not be written (no
            ``force``).
        batches, threads, bench_seconds: benchmark settings.
        keep: glob patterns on BN names; matching BNs stay unfolded (refusal code
            ``excluded``).
        reports: report files (``.md``, ``.json``) written after the run, also when
            validation failed.
        options: all of the above as one object.
        progress: callback ``(description, completed, total)``.
        check_stats: compare every BN's moving statistics with ``inputs`` (without data:
            flag what the weights show), and report how much each fold widened the
            weight range (``result.bn_stats``, ``Fold.widening``); see :mod:`bnfuse.stats`.
        recalibrate: re-estimate the moving statistics from ``inputs`` (upstream BNs
            first) before folding; validation then compares with the recalibrated model
            and ``result.recalibration`` says how far outputs moved from the original.
        providers: onnxruntime execution providers to time besides the CPU one
            (``"cuda"``, ``"tensorrt"``, ``"openvino"`` or full names; needs ``bench``).

    Returns:
        A :class:`~bnfuse.result.FuseResult`.

    Raises:
        ValidationError: validation failed and neither ``rollback`` nor ``force`` was
            given; ``err.result`` holds the report. Nothing was written.
        ModelLoadError, UnsupportedModelError, MissingDependencyError, UsageError.
    """
    # every keyword of this signature that is an Options field (all but model, output,
    # options, progress), as given
    given = Options(**{k: v for k, v in locals().items() if k in _OPTION_FIELDS})
    if options is not None and given != Options():
        raise UsageError("options: pass the settings either as options= or as keywords, not both")
    opts = (options if options is not None else given).check()
    try:
        result = _fuse(model, output, opts, progress)
    except ValidationError as exc:
        if opts.reports and exc.result is not None:
            _write_reports(exc.result, opts.reports)
        raise
    _write_reports(result, opts.reports)
    return result


_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))


def _write_reports(result: FuseResult, reports: Sequence[Path]) -> None:
    if reports:
        from bnfuse.report_files import write_report

        for path in reports:
            write_report(result, path)


def _fuse(model: Any, output: Any, o: Options, progress: Progress | None) -> FuseResult:
    """:func:`fuse` once its options are checked."""
    backend, src = get_backend(model)
    out_path = Path(output) if output is not None else None
    _check_request(backend, src, out_path, o)

    _report(progress, "loading model", 0, None)
    early_notes = _configure_threads(backend, o.threads) if o.bench else []
    original = backend.load(src, unsafe_load=o.unsafe_load) if src else backend.accept(model)
    before = backend.stats(original, src)
    bn_check = None
    if o.check_stats or o.recalibrate:  # before folding: --recalibrate changes what is folded
        from bnfuse.calibrate import check_model

        bn_check = check_model(
            backend,
            original,
            o.inputs,
            recalibrate=o.recalibrate,
            progress=lambda what: _report(progress, what, 0, None),
        )
        original = bn_check.folded
    options = FuseOptions(
        skip_rules=frozenset(o.skip),
        treat_initializer_inputs_as_constants=o.treat_initializer_inputs_as_constants,
        forward=o.forward,
        # a model loaded here and needed by nothing after the fold (no validation, no
        # benchmark): rewrite it without copying
        in_place=bool(src) and not o.validate and not o.bench and bn_check is None,
        keep=o.keep,
    )
    _report(progress, "folding", 0, None)
    passed = backend.fuse(original, options)
    if bn_check is not None:
        passed = bn_check.finish(passed)
    warnings = early_notes + list(passed.warnings)

    validation: Validation | None = None
    if o.validate and passed.folds:
        passed, validation = _validated(backend, original, passed, options, o, progress, warnings)

    # validation failed and nothing will be written: ValidationError is raised below
    failed = validation is not None and not validation.passed and not o.force
    if o.bench and failed:  # timing a model that is thrown away is wasted time
        warnings.append("benchmark skipped: validation failed (--force writes and times it anyway)")

    after = backend.stats(passed.model)
    fused_model = passed.model
    # the user's model object, made on first access (the ONNX backend then fills in the
    # weights it keeps outside the ModelProto); passed again to every replace below
    public = Deferred(lambda: backend.complete(fused_model))
    result = FuseResult(
        backend=backend.name,  # type: ignore[arg-type]
        source=str(src) if src else type(model).__name__,
        folds=tuple(passed.folds),
        refusals=tuple(passed.refusals),
        before=before,
        after=after,
        model=public,
        output_path=str(out_path) if out_path else None,
        dry_run=o.dry_run,
        validation=validation,
        bnfuse_version=__version__,
        framework=backend.framework(original),
        warnings=tuple(warnings),
        bn_stats=bn_check.entries(passed.folds, passed.refusals) if bn_check else (),
        recalibration=bn_check.outcome.recalibration if bn_check else None,
    )

    if o.bench and not failed:
        result = _replace(
            result,
            model=public,
            bench=benchmark(
                original,
                passed.model,
                batches=o.batches,
                threads=o.threads,
                seconds=o.bench_seconds,
                input_shapes=o.input_shapes,
                progress=progress,
                providers=o.providers,
                _backend=backend,
            ),
        )

    if validation is not None and failed:
        _raise_failed(validation, result)

    if out_path is not None and not o.dry_run:
        result = _written(backend, passed.model, out_path, result, public, progress)
    return result


def _check_request(backend: Backend, src: Path | None, out_path: Path | None, o: Options) -> None:
    """What :func:`_fuse` checks before any work: the output path, the rule names to
    skip, the execution providers."""
    if out_path is not None and not o.dry_run:
        _check_output_path(src, out_path, backend)
    unknown = sorted(set(o.skip) - set(backend.rule_names()))
    if unknown:
        raise OptionError(
            "skip",
            f"unknown rule(s) {', '.join(unknown)}; rules: {', '.join(backend.rule_names())}",
        )
    if o.providers:
        _providers.for_backend(backend.name, o.providers)  # fail before any work


def _raise_failed(validation: Validation, result: FuseResult) -> NoReturn:
    """Validation failed and nothing will be written: say which folds were to blame."""
    blamed = (
        f"; responsible fold(s): {', '.join(validation.culprits)}" if validation.culprits else ""
    )
    raise ValidationError(
        f"validation failed: fused outputs differ from the original{blamed}; "
        "nothing was written (use --rollback to drop those folds, --force to write anyway)",
        result,
    )


def _written(
    backend: Backend,
    fused: Any,
    out_path: Path,
    result: FuseResult,
    public: Deferred,
    progress: Progress | None,
) -> FuseResult:
    """Save the fused model to ``out_path``; the result with its written file's stats."""
    _report(progress, "writing", 0, None)
    backend.save(fused, out_path)
    save_notes = tuple(getattr(backend, "save_notes", ()))
    return _replace(
        result,
        model=public,
        written=True,
        after=backend.stats(fused, out_path),
        warnings=result.warnings + save_notes,
    )


def _validated(
    backend: Backend,
    original: Any,
    passed: PassResult,
    options: FuseOptions,
    o: Options,
    progress: Progress | None,
    warnings: list[str],
) -> tuple[PassResult, Validation]:
    """Validate the fused model; on failure bisect the culprits (and roll them back when
    ``o.rollback``). Returns the pass to keep and its validation."""
    import bnfuse.inputs as _inputs

    runner = backend.runner(original)
    if o.inputs is not None:
        feeds = _inputs.load_feeds(o.inputs, runner.inputs)
        source = str(o.inputs) if not isinstance(o.inputs, Mapping) else "user arrays"
        if isinstance(o.inputs, list | tuple):
            source = ", ".join(map(str, o.inputs))
    else:
        feeds = _inputs.random_feeds(runner.inputs, o.samples, o.seed, o.input_shapes)
        source = f"random (seed {o.seed}, {o.samples} samples)"
    _report(progress, "running the original", 0, None)
    reference = _Recorded(runner, feeds)
    del runner  # frees the original's session before the fused one is built
    ctx = _Ctx(
        backend, original, reference, options, feeds, o.rtol, o.atol, source, tuple(passed.folds)
    )
    _report(progress, "validating", 0, None)
    validation = ctx.validate(passed.model)
    if not validation.passed:
        _report(progress, "bisecting folds", 0, None)
        culprits = bisect_culprits(passed.folds, ctx.passes_with)
        names = tuple(f.bn for f in culprits)
        validation = _replace(validation, culprits=names)
        if o.rollback and names:
            passed = ctx.fused(frozenset(names))
            revalidated = ctx.validate(passed.model)
            validation = _replace(revalidated, culprits=names, rolled_back=names)
            warnings.append(f"rolled back {len(names)} fold(s): {', '.join(names)}")
    return passed, validation


def benchmark(
    original: Any,
    fused: Any,
    *,
    batches: Sequence[int] = (1,),
    threads: int = 1,
    seconds: float = 10.0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
    providers: Sequence[str] = (),
    _backend: Backend | None = None,
) -> BenchResult:
    """Time ``original`` against ``fused`` (paths or model objects of the same format).

    ONNX models run in onnxruntime on the CPU at ORT_DISABLE_ALL and ORT_ENABLE_ALL; Keras
    models as ``model(x, training=False)`` under ``tf.function`` and eagerly. Runs are
    interleaved (A B A B ...) after warm-up; ``seconds`` is the total budget of the timed
    loops, split across rows (session creation and warm-up come on top). ``providers``
    adds onnxruntime execution providers to the CPU one (ONNX models only, see
    :mod:`bnfuse.providers`).
    """
    import bnfuse.bench as _bench

    if threads < 1:
        raise UsageError("--threads must be at least 1")
    if any(b < 1 for b in batches):
        raise UsageError("batch sizes must be at least 1")
    backend = _backend
    if _backend is None:
        first, _ = get_backend(original)
        _configure_threads(first, threads)
    models = []
    for m in (original, fused):
        b, path = get_backend(m) if _backend is None else (_backend, None)
        backend = b
        if path is not None:
            models.append(b.load(path))
        else:
            models.append(m if _backend is not None else b.accept(m))
    if backend is None:  # unreachable: both arguments resolved a backend above
        raise UsageError("benchmark needs two models")
    timed = _providers.for_backend(backend.name, providers)
    kw: dict[str, Any] = {"providers": timed} if timed else {}
    result = _bench.run(
        backend.bench_targets(models[0], threads, **kw),
        backend.bench_targets(models[1], threads, **kw),
        backend.runner(models[0]).inputs,
        batches=batches,
        threads=threads,
        seconds=seconds,
        input_shapes=input_shapes or {},
        progress=progress,
    )
    return dataclasses.replace(result, providers=timed)


def _configure_threads(backend: Backend, threads: int) -> list[str]:
    """Keras/TensorFlow fixes its thread pools on first use: set them before loading."""
    if backend.name != "keras":
        return []
    from bnfuse.keras.runtime import configure_threads

    note = configure_threads(threads)
    return [note] if note else []


def _replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


def _report(progress: Progress | None, what: str, done: float, total: float | None) -> None:
    if progress is not None:
        progress(what, done, total)
