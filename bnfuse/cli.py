"""Command line: ``bnfuse MODEL... -o OUTPUT``. Parses flags into :class:`~bnfuse.options.Options`,
calls the API, renders, maps errors to exit codes.

Exit codes: 0 ok · 1 validation failed · 2 usage · 3 model load/unsupported ·
4 missing extra · 5 internal error (a bnfuse bug) · 130 interrupted. With several models
the exit code is the worst of theirs.

Start-up matters (a fold takes tens of milliseconds): the parser is :mod:`argparse` (typer
imports pydantic and builds a validator per option: ~60 ms), and the report, rich's
progress bar, onnxruntime and TensorFlow are imported only when a run needs them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from bnfuse import __version__
from bnfuse.cli_common import FLAGS, nothing, options_from
from bnfuse.cli_common import console_for as _console
from bnfuse.cli_common import is_terminal as _is_terminal
from bnfuse.cli_common import progress_bar as _progress
from bnfuse.errors import BnfuseError, ValidationError
from bnfuse.options import OptionError, Options, report_format

if TYPE_CHECKING:
    from bnfuse.result import FuseResult

__all__ = ["FLAGS", "main", "run"]

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 validation failed (nothing written), 2 usage error, "
    "3 model cannot be loaded or is unsupported, 4 optional dependency missing, "
    "5 internal error, 130 interrupted. With several models: the worst of theirs."
)

DESCRIPTION = """\
Fold BatchNormalization layers of MODEL into the neighbouring Dense/Conv layers.

Every BN is folded backward (into the layer before it) or forward (into the layer after
it) or refused with a reason. The fused model is validated against the original and
written atomically only if it matches.

Several models (or a directory of .onnx/.keras/.h5 files and SavedModel directories) go
to one output directory: each output keeps its input's name.

examples:
  bnfuse model.onnx -o fused.onnx
  bnfuse model.keras -o fused.keras --bench --batch 1,32 --report report.md
  bnfuse model.onnx --dry-run --json
  bnfuse models/ extra.onnx -o fused/ -j 2 --report reports/
"""


class _Usage(Exception):
    """A command-line error argparse found (printed as one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage block and the message on two+ lines; bnfuse says one line
        raise _Usage(message)


def _bool_pair(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    p.add_argument(  # --NAME / --no-NAME
        f"--{name}", dest=name.replace("-", "_"), default=default,
        action=argparse.BooleanOptionalAction, help=help,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags map 1:1 onto :class:`~bnfuse.options.Options` fields)."""
    p = _Parser(
        prog="bnfuse",
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = p.add_argument
    add(
        "models",
        nargs="+",
        metavar="MODEL",
        type=Path,
        help="model(s) to fuse: .onnx, .keras, .h5, a tf.keras SavedModel directory, or a "
        "directory of them",
    )
    add(
        "-o",
        "--output",
        type=Path,
        metavar="PATH",
        help="write the fused model here (.onnx, .keras, .h5; a SavedModel input: a "
        "directory); with several models, a directory (created)",
    )
    add("--dry-run", action="store_true", help="plan and report only; write nothing")
    add(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout (several models: JSON Lines, one per model)",
    )
    add(
        "--report",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="also write the report to FILE.md, FILE.json or FILE.html (one self-contained "
        "page with charts), or into a directory (one "
        "report per model plus a summary); repeatable",
    )
    add(
        "--skip",
        action="append",
        default=[],
        metavar="RULE",
        help="disable a rule by name (repeatable; see --list-rules)",
    )
    add(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave BNs whose name matches this glob unfolded (repeatable)",
    )
    _bool_pair(p, "forward", True, "allow folding a BN forward into the layer after it")
    _bool_pair(p, "validate", True, "compare fused and original outputs before writing")
    _add_run_flags(p)
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Validation, benchmark, loading and output flags."""
    add = p.add_argument
    add("--samples", type=int, default=8, help="random validation samples (default 8)")
    add("--seed", type=int, default=0, help="seed of the random validation inputs")
    add(
        "--inputs",
        type=Path,
        action="append",
        default=[],
        metavar="NPZ",
        help="validate on real data: an .npz keyed by input name, or a directory of .npz "
        "shards (repeatable)",
    )
    add(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="shape for an input with symbolic dims: NAME=1x3x224x224 (repeatable)",
    )
    add("--rtol", type=float, help="relative tolerance (default: by dtype)")
    add("--atol", type=float, help="absolute tolerance (default: by dtype and magnitude)")
    add(
        "--rollback",
        action="store_true",
        help="on validation failure, undo the responsible folds and write the rest",
    )
    add("--force", action="store_true", help="write the model even if validation fails")
    add("--bench", action="store_true", help="measure latency before and after")
    add("--batch", default="1", help="batch sizes to time, comma-separated (default 1)")
    add("--threads", type=int, default=1, help="runtime threads while timing (default 1)")
    add(
        "--bench-seconds",
        type=float,
        default=10.0,
        help="time budget of the benchmark (default 10)",
    )
    add(
        "--treat-initializer-inputs-as-constants",
        action="store_true",
        help="ONNX: initializers also listed as graph inputs are constants",
    )
    add(
        "--unsafe-load",
        action="store_true",
        help="Keras: allow Lambda layers (runs code stored in the file)",
    )
    add(
        "--provider",
        action="append",
        default=[],
        metavar="NAME",
        help="with --bench: also time onnxruntime on this execution provider (cuda, tensorrt, "
        "openvino, ...; repeatable); CPU is always timed",
    )
    add(
        "--check-stats",
        action="store_true",
        help="check BN moving statistics against --inputs (or the weights alone) and report "
        "how much each fold widens the weight range",
    )
    add(
        "--recalibrate",
        action="store_true",
        help="re-estimate BN moving statistics from --inputs (upstream first) before folding",
    )
    add(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="with several models: fuse N at once, in separate processes",
    )
    add(
        "--fail-fast",
        action="store_true",
        help="with several models: stop at the first one that fails",
    )
    add("--list-rules", action="store_true", help="list the rule names of MODEL's format and exit")
    add(
        "-v",
        "--verbose",
        action="store_true",
        help="show every BN with its full name, and TensorFlow's own messages",
    )
    add("-q", "--quiet", action="store_true", help="no progress bar")
    add("--version", action="version", version=f"bnfuse {__version__}")  # fmt: skip


def _message(exc: BnfuseError) -> str:
    if isinstance(exc, OptionError):  # the API names its parameter; say the flag instead
        return f"{FLAGS.get(exc.param, exc.param)}: {exc.detail}"
    return exc.message


class Streams:
    """Where the CLI writes: ``out`` (reports, JSON) and ``err`` (bnfuse's own lines and
    the progress bar). ``err`` stays the user's stderr while TensorFlow's is silenced."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.out = out
        self.err = err

    def error(self, text: str) -> None:
        self.err.write(f"bnfuse: error: {text}\n")
        self.err.flush()


def run(argv: Sequence[str] | None = None, *, out: IO[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    streams = Streams(out or sys.stdout, sys.stderr)
    try:
        args = build_parser().parse_args(argv)
    except _Usage as exc:
        streams.error(f"{exc} (see bnfuse --help)")
        return 2
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    from bnfuse.quiet import quiet_native_stderr

    keras_like = any(_needs_tensorflow(m) for m in args.models)
    with quiet_native_stderr(enabled=keras_like and not args.verbose) as err:
        streams.err = err
        return _guarded(args, streams)


def _guarded(args: argparse.Namespace, streams: Streams) -> int:
    """Run, turning every error into one line on stderr and its exit code."""
    try:
        return _dispatch(args, streams)
    except BnfuseError as exc:
        streams.error(_message(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        streams.err.write("bnfuse: interrupted; nothing written\n")
        streams.err.flush()
        return 130
    except Exception as exc:  # a bug: one line, no locals, no weights
        if os.environ.get("BNFUSE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        streams.error(
            f"internal error ({type(exc).__name__}: {first}); this is a bnfuse bug, "
            "rerun with BNFUSE_DEBUG=1 for a traceback"
        )
        return 5


def _needs_tensorflow(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in (".keras", ".h5", ".hdf5")


def _dispatch(args: argparse.Namespace, streams: Streams) -> int:
    if args.list_rules:
        from bnfuse import api

        backend, _ = api.get_backend(args.models[0])
        streams.out.write("".join(f"{name}\n" for name in backend.rule_names()))
        return 0
    from bnfuse.many import is_collection

    if len(args.models) > 1 or is_collection(args.models[0]):
        from bnfuse.cli_many import run_many

        return run_many(args, streams)
    files = [r for r in args.report if report_format(r) is not None]
    dirs = [r for r in args.report if report_format(r) is None and r.suffix == ""]
    bad = [r for r in args.report if r not in files and r not in dirs]
    if bad:
        raise OptionError(
            "reports", f"{bad[0]}: use a .md, .json or .html file name (or a directory)"
        )
    for d in dirs:  # one model, --report DIR: its reports go in there
        from bnfuse.many import report_paths

        d.mkdir(parents=True, exist_ok=True)
        files += report_paths(args.models[0], d)
    return _run_one(args, options_from(args, files), streams)


def _run_one(args: argparse.Namespace, options: Options, streams: Streams) -> int:
    from bnfuse import api

    show_progress = not args.quiet and not args.json and _is_terminal(streams.err)
    progress_cb, stop = _progress(streams.err) if show_progress else (None, nothing)
    failure: ValidationError | None = None
    result: FuseResult | None = None
    try:
        try:
            result = api.fuse(args.models[0], args.output, options=options, progress=progress_cb)
        except ValidationError as exc:
            failure, result = exc, exc.result
    finally:
        stop()
    if result is not None:
        from bnfuse import report as _report

        if args.json:
            streams.out.write(_report.to_json(result) + "\n")
        else:
            _report.render(result, _console(streams.out), verbose=args.verbose)
    if failure is not None:
        raise failure
    return 0


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into the same clean unwind as Ctrl-C: temporary files are removed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``bnfuse`` console script."""
    signal.signal(signal.SIGTERM, _terminate)
    code = run(argv)
    sys.stdout.flush()
    raise SystemExit(code)


def __getattr__(name: str) -> Any:
    # ``bnfuse.cli.app``: a typer app around :func:`run`, for ``typer.testing.CliRunner``
    # (built on first use: the command line itself never imports typer)
    if name == "app":
        from bnfuse._cli_compat import make_app

        return make_app(run)
    raise AttributeError(name)


if __name__ == "__main__":
    main()
