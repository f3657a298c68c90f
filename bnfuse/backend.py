"""What a model format must provide so the shared pipeline (validate, bench, write) can use it.

The ONNX and Keras backends implement :class:`Backend`; :mod:`bnfuse.api` picks one lazily
so that fusing an ONNX model never imports tensorflow.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnfuse.result import Fold, ModelStats, Refusal

__all__ = [
    "Backend",
    "BenchTarget",
    "FuseOptions",
    "InputSpec",
    "PassResult",
    "Runner",
    "atomic_path",
    "open_fresh",
]


@dataclass(frozen=True)
class FuseOptions:
    """Options of one fusion pass.

    ``exclude`` names BN nodes/layers that must stay (used by rollback and bisection);
    ``skip_rules`` names rules to disable. ``in_place`` lets a backend rewrite the model
    object it is given instead of a copy: only for a model bnfuse loaded itself and will
    not need again (no validation, no benchmark); the ONNX backend then skips the copy.
    """

    skip_rules: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    treat_initializer_inputs_as_constants: bool = False
    forward: bool = True  # allow forward folds (BN into the layer after it)
    in_place: bool = False
    keep: tuple[str, ...] = ()  # glob patterns on BN names: stay unfolded (bnfuse/keep.py)


@dataclass
class PassResult:
    """The fused model (a new object unless ``FuseOptions.in_place``) and what happened."""

    model: Any
    folds: list[Fold] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (str/None for symbolic dims)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]


class Runner(Protocol):
    """Runs a model for validation (ONNX: onnxruntime with graph optimizations disabled)."""

    @property
    def inputs(self) -> Sequence[InputSpec]:
        """The model's inputs."""
        ...

    @property
    def output_names(self) -> Sequence[str]:
        """The model's output names, in the order :meth:`run` returns them."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on ``feeds`` and return every output."""
        ...


@dataclass(frozen=True)
class BenchTarget:
    """A way to run a model that the benchmark times (one runtime setting).

    ``prepare()`` does the one-off work (create a session, trace a function) and returns a
    callable that runs the model once on the given feeds.
    """

    runtime: str
    prepare: Callable[[], Callable[[Mapping[str, np.ndarray]], Any]]
    note: str = ""


class Backend(Protocol):
    """A model format. The model objects its methods take and return are the backend's
    own (they may be wrappers); :meth:`complete` gives the user-facing object."""

    name: str

    def load(self, path: Path, *, unsafe_load: bool = False) -> Any:
        """Read a model file; raise ModelLoadError / UnsupportedModelError."""
        ...

    def accept(self, model: Any) -> Any:
        """Check an in-memory model object; return the object to work on."""
        ...

    def rule_names(self) -> tuple[str, ...]:
        """Names of every rule, as ``--skip`` accepts them."""
        ...

    def fuse(self, model: Any, options: FuseOptions) -> PassResult:
        """Fold every foldable BN; never mutates ``model``."""
        ...

    def framework(self, model: Any) -> str:
        """The model's format and the framework version that wrote it (for reports)."""
        ...

    def stats(self, model: Any, path: Path | None = None) -> ModelStats:
        """Node/parameter counts (and file size when ``path`` is given)."""
        ...

    def runner(self, model: Any) -> Runner:
        """A runner for validation."""
        ...

    def bench_targets(
        self, model: Any, threads: int, *, providers: Sequence[str] = ()
    ) -> list[BenchTarget]:
        """Runtime settings to time, in report order (``providers``: onnxruntime
        execution providers, ONNX only)."""
        ...

    def save(self, model: Any, path: Path) -> None:
        """Write ``model`` to ``path`` atomically (see :func:`atomic_path`)."""
        ...

    def complete(self, model: Any) -> Any:
        """The model object a user gets (``FuseResult.model``) from what :meth:`load`,
        :meth:`accept` or :meth:`fuse` returned: the ONNX backend fills in the weights it
        kept outside the ModelProto; other backends return ``model``."""
        ...


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s directory; rename it onto ``dest`` on success.

    The temporary file exists (empty) when it is yielded, writable by its owner; ``dest``
    gets the permissions of the file it replaces, else those of any new file (``0o666``
    less the umask, applied by the kernel; ``tempfile.mkstemp`` would leave ``0o600``),
    set just before the rename. Writers should fill it without truncating it
    (:func:`open_fresh`): on ext4, opening an existing file with ``O_TRUNC`` makes the
    kernel flush it to disk on close (``auto_da_alloc``; measured 1.5 ms for 2.7 MB).

    On any exception (KeyboardInterrupt included) the temporary file is removed, so an
    interrupted write never leaves a partial output behind.
    """
    dest = Path(dest)
    fd, tmp_path = _new_temp(dest)
    try:
        try:
            try:  # replacing a file: keep its mode; else what the kernel gave a new file
                mode = os.stat(dest).st_mode & 0o777
            except FileNotFoundError:
                mode = os.fstat(fd).st_mode & 0o777
            writable = mode | stat.S_IRUSR | stat.S_IWUSR  # (a 0o444 mode or umask 0o222)
            if writable != os.fstat(fd).st_mode & 0o777:
                os.fchmod(fd, writable)
        finally:
            os.close(fd)
        yield tmp_path
        if stat.S_IMODE(os.stat(tmp_path).st_mode) != mode:  # (or a writer made it anew)
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _new_temp(dest: Path) -> tuple[int, Path]:
    """Create a new, empty file with a random name beside ``dest`` (``O_EXCL``, so an
    existing file or link is never reused); returns its descriptor and path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        # os.urandom, as secrets.token_hex uses, without importing hashlib (~5 ms at start-up)
        tmp = dest.parent / f".{dest.name}.{os.urandom(4).hex()}.bnfuse-tmp{dest.suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {dest}")


def open_fresh(path: str | os.PathLike[str]) -> Any:
    """Open ``path`` for writing from its start, creating it if needed, without
    ``O_TRUNC`` (see :func:`atomic_path`); call ``truncate()`` after the last write in
    case the file held more."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666), "wb")
