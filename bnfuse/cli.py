"""Command line: ``bnfuse MODEL -o OUTPUT``. Parses options, calls the API, renders, maps errors.

Exit codes: 0 ok · 1 validation failed · 2 usage · 3 model load/unsupported ·
4 missing extra · 5 internal error (a bnfuse bug).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bnfuse import __version__
from bnfuse.errors import BnfuseError, UsageError, ValidationError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 validation failed (nothing written), 2 usage error, "
    "3 model cannot be loaded or is unsupported, 4 optional dependency missing, "
    "5 internal error."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnfuse {__version__}")
        raise typer.Exit()


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(
            f"--batch {text!r}: expected comma-separated integers, e.g. 1,32"
        ) from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--batch {text!r}: batch sizes must be positive integers")
    return values


@app.command(epilog=EXIT_CODES_HELP)
def fuse_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model to fuse: .onnx, .keras, .h5 or a tf.keras SavedModel directory.",
            show_default=False,
            metavar="MODEL",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write the fused model here (.onnx, .keras, .h5; a directory: SavedModel).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan and report only; write nothing.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
    report: Annotated[
        list[Path] | None,
        typer.Option(
            "--report",
            help="Also write the report to FILE.md (Markdown) or FILE.json.",
            show_default=False,
        ),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip",
            help="Disable a rule by name (repeatable; see --list-rules).",
            show_default=False,
        ),
    ] = None,
    forward: Annotated[
        bool,
        typer.Option(
            "--forward/--no-forward", help="Allow folding a BN forward into the layer after it."
        ),
    ] = True,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate", help="Compare fused and original outputs before writing."
        ),
    ] = True,
    samples: Annotated[int, typer.Option("--samples", help="Random validation samples.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random validation inputs.")] = 0,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="Validate on real data: an .npz keyed by input name.",
            show_default=False,
        ),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Shape for an input with symbolic dims: NAME=1x3x224x224 (repeatable).",
            show_default=False,
        ),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Relative tolerance (default: by dtype).", show_default=False),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option(
            "--atol",
            help="Absolute tolerance (default: by dtype and output magnitude).",
            show_default=False,
        ),
    ] = None,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback",
            help="On validation failure, undo the responsible folds and write the rest.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write the model even if validation fails.")
    ] = False,
    bench: Annotated[
        bool, typer.Option("--bench", help="Measure latency before and after.")
    ] = False,
    batch: Annotated[
        str, typer.Option("--batch", help="Batch sizes to time, comma-separated.")
    ] = "1",
    threads: Annotated[int, typer.Option("--threads", help="Runtime threads while timing.")] = 1,
    bench_seconds: Annotated[
        float, typer.Option("--bench-seconds", help="Time budget of the benchmark.")
    ] = 10.0,
    treat_initializer_inputs_as_constants: Annotated[
        bool,
        typer.Option(
            "--treat-initializer-inputs-as-constants",
            help="ONNX: initializers also listed as graph inputs are constants.",
        ),
    ] = False,
    unsafe_load: Annotated[
        bool,
        typer.Option(
            "--unsafe-load", help="Keras: allow Lambda layers (runs code stored in the file)."
        ),
    ] = False,
    list_rules: Annotated[
        bool, typer.Option("--list-rules", help="List the rule names of MODEL's format and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show more detail.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Fold BatchNormalization layers of MODEL into the neighbouring Dense/Conv layers.

    Every BN is folded backward (into the layer before it) or forward (into the layer after it) or refused with a reason. The fused model is validated against the original and written atomically only if it matches.

    Examples:

      bnfuse model.onnx -o fused.onnx

      bnfuse model.keras -o fused.keras --bench --batch 1,32 --report report.md

      bnfuse model.onnx --dry-run --json
    """
    out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True)
    try:
        code = _run(
            out,
            err,
            model,
            output,
            dry_run,
            json_out,
            report or [],
            skip or [],
            forward,
            validate,
            samples,
            seed,
            inputs,
            input_shape or [],
            rtol,
            atol,
            rollback,
            force,
            bench,
            batch,
            threads,
            bench_seconds,
            treat_initializer_inputs_as_constants,
            unsafe_load,
            list_rules,
            verbose,
            quiet,
        )
    except BnfuseError as exc:
        err.print(f"bnfuse: error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("bnfuse: interrupted; nothing written", markup=False)
        raise typer.Exit(130) from None
    except (typer.Exit, SystemExit):
        raise
    except Exception as exc:  # a bug: one line, no locals, no weights
        if os.environ.get("BNFUSE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        err.print(
            f"bnfuse: internal error ({type(exc).__name__}: {first}); this is a bnfuse bug, "
            "rerun with BNFUSE_DEBUG=1 for a traceback",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(5) from None
    raise typer.Exit(code)


def _run(
    out: Console,
    err: Console,
    model: Path,
    output: Path | None,
    dry_run: bool,
    json_out: bool,
    reports: list[Path],
    skip: list[str],
    forward: bool,
    validate: bool,
    samples: int,
    seed: int,
    inputs: Path | None,
    input_shape: list[str],
    rtol: float | None,
    atol: float | None,
    rollback: bool,
    force: bool,
    bench: bool,
    batch: str,
    threads: int,
    bench_seconds: float,
    treat_init: bool,
    unsafe_load: bool,
    list_rules: bool,
    verbose: bool,
    quiet: bool,
) -> int:
    from bnfuse import api
    from bnfuse import report as _report

    if list_rules:
        backend, _ = api.get_backend(model)
        for name in backend.rule_names():
            out.print(name, markup=False, highlight=False)
        return 0
    for r in reports:
        if r.suffix.lower() not in (".md", ".json"):
            raise UsageError(f"--report {r}: use a .md or .json file name")
    shapes: dict[str, tuple[int, ...]] = {}
    if input_shape:
        from bnfuse.inputs import parse_input_shape

        for text in input_shape:
            name, shape = parse_input_shape(text)
            shapes[name] = shape
    batches = _parse_batches(batch)
    show_progress = not quiet and not json_out and err.is_terminal

    progress_cb, stop = _progress(err) if show_progress else (None, lambda: None)
    try:
        result: Any = None
        failure: ValidationError | None = None
        try:
            result = api.fuse(
                model,
                output,
                validate=validate,
                samples=samples,
                seed=seed,
                rtol=rtol,
                atol=atol,
                inputs=inputs,
                input_shapes=shapes,
                rollback=rollback,
                force=force,
                dry_run=dry_run,
                skip=skip,
                forward=forward,
                treat_initializer_inputs_as_constants=treat_init,
                unsafe_load=unsafe_load,
                bench=bench,
                batches=batches,
                threads=threads,
                bench_seconds=bench_seconds,
                progress=progress_cb,
            )
        except ValidationError as exc:
            failure = exc
            result = exc.result
    finally:
        stop()
    if result is not None:
        for r in reports:
            _report.write_report(result, r)
        if json_out:
            out.print(_report.to_json(result), markup=False, highlight=False, soft_wrap=True)
        else:
            _report.render(result, out, verbose=verbose)
    if failure is not None:
        raise failure
    return 0


def _progress(err: Console) -> tuple[Any, Any]:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    prog = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    prog.start()
    task = prog.add_task("starting", total=None)

    def cb(description: str, completed: float, total: float | None) -> None:
        prog.update(task, description=description, completed=completed, total=total)

    return cb, prog.stop


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into the same clean unwind as Ctrl-C: temporary files are removed.
    raise KeyboardInterrupt


def main() -> None:
    """Entry point of the ``bnfuse`` console script."""
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="bnfuse")


if __name__ == "__main__":
    main()
