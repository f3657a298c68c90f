"""Several models in one run: :func:`fuse_many` (the API) and :func:`expand_models`.

Each model is fused with the same :class:`~bnfuse.options.Options`; one failing does not
stop the others (unless ``fail_fast``). With ``jobs > 1`` models are fused in separate
processes (``spawn``: a worker never inherits a half-initialised TensorFlow), and each
worker returns its result without the model object.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bnfuse.errors import BnfuseError, UsageError, ValidationError
from bnfuse.options import OptionError, Options, html_available
from bnfuse.result import FuseResult

__all__ = [
    "MODEL_SUFFIXES",
    "ModelRun",
    "expand_models",
    "fuse_many",
    "report_paths",
    "worst_exit_code",
]

#: files a directory given as MODEL contributes (plus Keras SavedModel directories)
MODEL_SUFFIXES = (".onnx", ".keras", ".h5", ".hdf5")

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class ModelRun:
    """What happened to one model of :func:`fuse_many`.

    ``result`` is None when the model failed before there was a result (unreadable,
    unsupported) or was skipped; its ``model`` is not kept (None). ``exit_code`` is the
    one ``bnfuse`` would exit with for this model alone; ``error`` its one-line message.
    """

    source: str
    output: str | None
    status: Status
    result: FuseResult | None = None
    error: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    reports: tuple[str, ...] = ()
    param: str = ""  # for a bad setting: the Options field it names


def _is_saved_model(path: Path) -> bool:
    return path.is_dir() and (
        (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()
    )


def is_collection(path: Path) -> bool:
    """Does ``path`` stand for the models inside it (a directory that is neither a
    SavedModel nor named like a model file)?"""
    return path.is_dir() and path.suffix.lower() not in MODEL_SUFFIXES and not _is_saved_model(path)


def expand_models(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The model paths ``paths`` stand for: a file as given; a SavedModel directory as
    itself; another directory as its ``.onnx``, ``.keras``, ``.h5`` files and SavedModel
    subdirectories (sorted by name, not recursive). Duplicates are dropped.

    Raises:
        OptionError: a directory holds no model.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if is_collection(p):
            inside = sorted(
                c
                for c in p.iterdir()
                if (c.is_file() and c.suffix.lower() in MODEL_SUFFIXES) or _is_saved_model(c)
            )
            if not inside:
                raise OptionError(
                    "models",
                    f"{p}: no .onnx, .keras or .h5 files or SavedModel directories inside",
                )
            found.extend(inside)
        else:
            found.append(p)
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p, None)
    return list(unique)


def _outputs(models: Sequence[Path], output_dir: Path | None) -> list[Path | None]:
    if output_dir is None:
        return [None] * len(models)
    outs = [output_dir / m.name for m in models]
    seen: dict[Path, Path] = {}
    for m, o in zip(models, outs, strict=True):
        if o in seen:
            raise OptionError(
                "output_dir", f"{seen[o]} and {m} would both be written to {o}: rename one"
            )
        seen[o] = m
    return list(outs)


def worst_exit_code(runs: Iterable[ModelRun]) -> int:
    """The exit code of a run of several models: the worst (highest) of theirs."""
    return max((r.exit_code for r in runs), default=0)


def report_paths(source: Path, report_dir: Path | None) -> tuple[Path, ...]:
    """The reports of ``source`` in ``report_dir``: ``NAME.md``, ``NAME.json`` and, with
    the ``html`` extra installed, ``NAME.html`` (NAME: the model's file name)."""
    if report_dir is None:
        return ()
    suffixes = (".md", ".json", ".html") if html_available() else (".md", ".json")
    return tuple(report_dir / f"{source.name}{suffix}" for suffix in suffixes)


def fuse_one(
    source: Path,
    output: Path | None,
    options: Options,
    report_dir: Path | None = None,
    progress: Callable[[str, float, float | None], None] | None = None,
) -> ModelRun:
    """Fuse one model of a batch; every error becomes the run's status (never raised,
    except KeyboardInterrupt). Runs in a worker process when ``jobs > 1``."""
    from bnfuse import api

    reports = report_paths(source, report_dir)
    opts = options.replace(reports=options.reports + reports)
    start = time.perf_counter()
    result: FuseResult | None = None
    error, code, param = "", 0, ""
    try:
        result = api.fuse(source, output, options=opts, progress=progress)
    except ValidationError as exc:
        result, error, code = exc.result, exc.message, exc.exit_code
    except OptionError as exc:  # e.g. a --skip rule this model's format does not have
        error, code, param = exc.message, exc.exit_code, exc.param
    except BnfuseError as exc:
        error, code = exc.message, exc.exit_code
    except Exception as exc:  # a bug in bnfuse: this model fails, the others go on
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        error = f"internal error ({type(exc).__name__}: {first}); this is a bnfuse bug"
        code = 5
    seconds = time.perf_counter() - start
    if result is not None:  # the model object stays here (it may not pickle; it is big)
        result = dataclasses.replace(result, model=None)
    written = result is not None and result.written
    return ModelRun(
        source=str(source),
        output=str(output) if output is not None and written else None,
        status="failed" if code else "ok",
        result=result,
        error=error,
        exit_code=code,
        seconds=seconds,
        reports=tuple(str(p) for p in reports if p.exists()),
        param=param,
    )


def fuse_many(
    models: Iterable[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    options: Options | None = None,
    jobs: int = 1,
    fail_fast: bool = False,
    report_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str, float, float | None], None] | None = None,
    on_result: Callable[[ModelRun], None] | None = None,
    **settings: Any,
) -> list[ModelRun]:
    """Fuse several models with the same settings.

    Args:
        models: model files, SavedModel directories, or directories of models (see
            :func:`expand_models`).
        output_dir: where the fused models go (created), each under its input's name;
            None writes nothing (a report-only run).
        options: the settings (an :class:`~bnfuse.options.Options`), or give them as
            keyword arguments (``validate=False``...) like :func:`bnfuse.fuse`.
        jobs: how many models are fused at once, each in its own process.
        fail_fast: stop at the first model that fails; the rest are ``skipped``.
        report_dir: write ``NAME.md``, ``NAME.json`` (and ``NAME.html`` with the ``html``
            extra) per model there (created).
        progress: ``(description, models done, models in all)``.
        on_result: called with each :class:`ModelRun` as soon as it is done.

    Returns:
        One :class:`ModelRun` per model, in input order. A model that fails does not
        raise: see its ``status``, ``error`` and ``exit_code``
        (:func:`worst_exit_code` gives the run's).

    Raises:
        UsageError: bad settings, a directory without models, two inputs with the same
            name, ``jobs < 1``. Raised before any model is read.
    """
    if options is not None and settings:
        raise UsageError("options: pass the settings either as options= or as keywords, not both")
    opts = (options if options is not None else Options(**settings)).check()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise OptionError("jobs", f"must be an integer >= 1, got {jobs!r}")
    paths = expand_models(models)
    out_dir = Path(output_dir) if output_dir is not None else None
    outs = _outputs(paths, out_dir)
    if out_dir is not None and not out_dir.is_dir() and out_dir.suffix.lower() in MODEL_SUFFIXES:
        raise OptionError("output_dir", f"{out_dir}: with several models the output is a directory")
    if out_dir is not None and not opts.dry_run:
        if out_dir.exists() and not out_dir.is_dir():
            raise OptionError("output_dir", f"{out_dir}: exists and is not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    reports = Path(report_dir) if report_dir is not None else None
    if reports is not None:
        reports.mkdir(parents=True, exist_ok=True)
    runs: dict[int, ModelRun] = {}
    total = len(paths)

    def done(i: int, run: ModelRun) -> None:
        runs[i] = run
        if on_result is not None:
            on_result(run)
        if progress is not None:
            progress(f"{len(runs)}/{total} models", len(runs), total)

    if jobs == 1 or total == 1:
        _serial(paths, outs, opts, reports, fail_fast, progress, done)
    else:
        _parallel(paths, outs, opts, reports, fail_fast, jobs, done)
    for i, p in enumerate(paths):
        if i not in runs:
            runs[i] = ModelRun(str(p), None, "skipped", error="not run (--fail-fast)")
    return [runs[i] for i in range(total)]


def _serial(
    paths: Sequence[Path],
    outs: Sequence[Path | None],
    opts: Options,
    reports: Path | None,
    fail_fast: bool,
    progress: Callable[[str, float, float | None], None] | None,
    done: Callable[[int, ModelRun], None],
) -> None:
    total = len(paths)
    for i, (p, o) in enumerate(zip(paths, outs, strict=True)):
        inner = None if progress is None else _prefixed(progress, p.name, i, total)
        if inner is not None:
            inner("starting", 0, None)
        run = fuse_one(p, o, opts, reports, inner)
        done(i, run)
        if fail_fast and run.exit_code:
            return


def _prefixed(
    progress: Callable[[str, float, float | None], None], name: str, i: int, total: int
) -> Callable[[str, float, float | None], None]:
    """One model's steps on the bar of the whole run: ``"m.onnx: validating"``, i of total."""

    def step(what: str, _done: float, _total: float | None) -> None:
        progress(f"{name}: {what}", i, total)

    return step


def _parallel(
    paths: Sequence[Path],
    outs: Sequence[Path | None],
    opts: Options,
    reports: Path | None,
    fail_fast: bool,
    jobs: int,
    done: Callable[[int, ModelRun], None],
) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(paths)), mp_context=ctx) as pool:
        pending: dict[Future[ModelRun], int] = {
            pool.submit(fuse_one, p, o, opts, reports): i
            for i, (p, o) in enumerate(zip(paths, outs, strict=True))
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    run = fut.result()
                    done(i, run)
                    if fail_fast and run.exit_code:
                        for other in pending:
                            other.cancel()
        except BaseException:
            for other in pending:
                other.cancel()
            raise
