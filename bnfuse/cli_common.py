"""What the single-model and several-model command lines share: the flag names of the
options, turning parsed flags into :class:`~bnfuse.options.Options`, the terminal checks
and the progress bar (rich is imported only when a bar or a table is drawn)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from bnfuse.errors import UsageError
from bnfuse.options import Options

__all__ = ["FLAGS", "console_for", "is_terminal", "nothing", "options_from", "progress_bar"]

#: :class:`Options` field (as :class:`OptionError` names it) -> the flag that sets it.
FLAGS: dict[str, str] = {
    "samples": "--samples",
    "seed": "--seed",
    "rtol": "--rtol",
    "atol": "--atol",
    "inputs": "--inputs",
    "input_shapes": "--input-shape",
    "skip": "--skip",
    "batches": "--batch",
    "threads": "--threads",
    "bench_seconds": "--bench-seconds",
    "keep": "--keep",
    "reports": "--report",
    "recalibrate": "--recalibrate",
    "providers": "--provider",
    "check_stats": "--check-stats",
    "jobs": "--jobs",
    "models": "MODEL",
    "output_dir": "--output",
}


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(
            f"--batch {text!r}: expected comma-separated integers, e.g. 1,32"
        ) from None


def options_from(args: argparse.Namespace, reports: Sequence[Path] = ()) -> Options:
    """The :class:`Options` the parsed flags ask for (values are checked by the API)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if args.input_shape:
        from bnfuse.inputs import parse_input_shape

        for text in args.input_shape:
            name, shape = parse_input_shape(text)
            shapes[name] = shape
    return Options(
        validate=args.validate,
        samples=args.samples,
        seed=args.seed,
        rtol=args.rtol,
        atol=args.atol,
        inputs=_inputs_arg(args.inputs),
        input_shapes=shapes,
        rollback=args.rollback,
        force=args.force,
        dry_run=args.dry_run,
        skip=tuple(args.skip),
        forward=args.forward,
        treat_initializer_inputs_as_constants=args.treat_initializer_inputs_as_constants,
        unsafe_load=args.unsafe_load,
        bench=args.bench,
        batches=_parse_batches(args.batch),
        threads=args.threads,
        bench_seconds=args.bench_seconds,
        keep=tuple(args.keep),
        reports=tuple(reports),
        check_stats=args.check_stats,
        recalibrate=args.recalibrate,
        providers=tuple(args.provider),
    )


def _inputs_arg(paths: list[Path]) -> Path | tuple[Path, ...] | None:
    """``--inputs`` as the API takes it: one path, several, or None."""
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else tuple(paths)


def nothing() -> None:
    return None


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def console_for(stream: IO[str]) -> Any:
    from rich.console import Console

    return Console(file=stream, soft_wrap=False, width=None if is_terminal(stream) else 160)


def progress_bar(err: IO[str] | Any, total: float | None = None) -> tuple[Any, Callable[[], None]]:
    """A progress bar on ``err`` (a stream or a rich Console): ``(callback, stop)``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = err if isinstance(err, Console) else Console(file=err)
    prog = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    prog.start()
    task = prog.add_task("starting", total=total)

    def cb(description: str, completed: float, total: float | None) -> None:
        prog.update(task, description=description, completed=completed, total=total)

    return cb, prog.stop
