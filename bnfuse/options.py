"""The settings of one fusion run, as one typed object, and the only place they are checked.

:func:`bnfuse.fuse` accepts an :class:`Options` (``options=``) or the same settings as
keyword arguments; the command line builds one from its flags. Every value check lives in
:meth:`Options.check` and raises :class:`OptionError`, which names the *parameter*
(``samples``, ``batches``...); the CLI maps that name to its flag (``--samples``,
``--batch``). This module imports nothing heavy: the CLI uses it before any framework.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bnfuse.errors import MissingDependencyError, UsageError

__all__ = [
    "REPORT_SUFFIXES",
    "OptionError",
    "Options",
    "html_available",
    "report_format",
    "require_html_extra",
]

#: Report file suffixes and the format each writes.
REPORT_SUFFIXES: dict[str, str] = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".json": "json",
    ".html": "html",
}


class OptionError(UsageError):
    """A setting has a value bnfuse cannot use. ``param`` is the :class:`Options` field
    (the keyword argument of :func:`bnfuse.fuse`), ``detail`` what is wrong with it."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


def require_html_extra() -> None:
    """Raise :class:`MissingDependencyError` (exit 4) unless matplotlib, which draws the
    HTML report's charts, is installed (``bnfuse[html]``)."""
    if not html_available():
        raise MissingDependencyError("matplotlib", "html")


def html_available() -> bool:
    """True when the ``html`` extra (matplotlib) is installed: a report directory then
    also gets one HTML page per model and a summary page."""
    return importlib.util.find_spec("matplotlib") is not None


def report_format(path: str | os.PathLike[str]) -> str | None:
    """``"markdown"``, ``"json"`` or ``"html"`` for a report file name, None for another
    suffix."""
    return REPORT_SUFFIXES.get(Path(path).suffix.lower())


@dataclass(frozen=True)
class Options:
    """Settings of :func:`bnfuse.fuse` (see its docstring for each one's meaning).

    ``keep`` holds glob patterns (``fnmatch``, case-sensitive) on BN node / layer names:
    matching BNs stay unfolded and are reported as refused with code ``excluded``.
    ``reports`` are files (``.md``, ``.json``) the report is written to after the run.
    """

    validate: bool = True
    samples: int = 8
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any] | None = (
        None
    )
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    rollback: bool = False
    force: bool = False
    dry_run: bool = False
    skip: tuple[str, ...] = ()
    forward: bool = True
    treat_initializer_inputs_as_constants: bool = False
    unsafe_load: bool = False
    bench: bool = False
    batches: tuple[int, ...] = (1,)
    threads: int = 1
    bench_seconds: float = 10.0
    keep: tuple[str, ...] = ()
    reports: tuple[Path, ...] = ()
    check_stats: bool = False
    recalibrate: bool = False
    providers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # sequences given as lists (or one string) become tuples, so options compare and hash
        for name in ("skip", "keep", "providers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "batches", tuple(self.batches))
        object.__setattr__(self, "reports", tuple(Path(p) for p in self.reports))
        object.__setattr__(self, "input_shapes", dict(self.input_shapes or {}))
        if isinstance(self.inputs, list):  # several data files: a tuple, so options compare
            object.__setattr__(self, "inputs", tuple(self.inputs))

    def check(self) -> Options:
        """Raise :class:`OptionError` for the first value that cannot be used; else self."""
        if isinstance(self.samples, bool) or not isinstance(self.samples, int):
            raise OptionError("samples", f"expected an integer, got {self.samples!r}")
        if self.samples < 1:
            raise OptionError("samples", f"must be at least 1, got {self.samples}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise OptionError(name, f"must be a finite number >= 0, got {value}")
        if not self.batches:
            raise OptionError("batches", "needs at least one batch size")
        bad = [b for b in self.batches if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if bad:
            raise OptionError("batches", f"batch sizes must be positive integers, got {bad[0]!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise OptionError("threads", f"must be an integer >= 1, got {self.threads!r}")
        if not (math.isfinite(self.bench_seconds) and self.bench_seconds > 0):
            raise OptionError("bench_seconds", f"must be > 0 seconds, got {self.bench_seconds}")
        if self.recalibrate and self.inputs is None:
            raise OptionError("recalibrate", "needs data: give inputs (.npz files or a directory)")
        for pattern in self.keep:
            if not isinstance(pattern, str) or not pattern:
                raise OptionError("keep", f"patterns must be non-empty strings, got {pattern!r}")
        for report in self.reports:
            if report_format(report) is None:
                raise OptionError(
                    "reports", f"{report}: use a .md, .json or .html file name (or a directory)"
                )
        if any(report_format(r) == "html" for r in self.reports):
            require_html_extra()
        if self.providers and not self.bench:
            raise OptionError("providers", "chooses where the benchmark runs: add bench")
        for name, shape in self.input_shapes.items():
            if not shape or any(isinstance(d, bool) or int(d) != d or d < 1 for d in shape):
                raise OptionError("input_shapes", f"{name}: dims must be positive integers")
        return self

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` (like :func:`dataclasses.replace`)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Options(**values)
