"""The exceptions bnfuse raises, and the CLI exit code each maps to.

::

    BnfuseError                  base class; never raised itself
    ├── UsageError               bad option value (exit 2)
    ├── ModelLoadError           unreadable, truncated, not a model, missing external data (exit 3)
    ├── UnsupportedModelError    e.g. subclassed Keras model, opset the runtime cannot load (exit 3)
    ├── MissingDependencyError   an optional extra is not installed (exit 4)
    ├── ValidationError          fused outputs differ from the original; nothing written (exit 1)
    └── FusionInvariantError     a postcondition of the fold broke: a bnfuse bug (exit 5)

Every message is one readable line meant for the user.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfuse.result import FuseResult

__all__ = [
    "BnfuseError",
    "FusionInvariantError",
    "MissingDependencyError",
    "ModelLoadError",
    "UnsupportedModelError",
    "UsageError",
    "ValidationError",
    "first_line",
]


class BnfuseError(Exception):
    """Base class of every error bnfuse raises on purpose."""

    exit_code: int = 3

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(BnfuseError):
    """An option has a value bnfuse cannot use (malformed shape, unknown rule, ...)."""

    exit_code = 2


class ModelLoadError(BnfuseError):
    """The model file cannot be read: missing, unreadable, truncated, not a model."""

    exit_code = 3


class UnsupportedModelError(BnfuseError):
    """The model was read but bnfuse cannot rewrite or run it."""

    exit_code = 3


class MissingDependencyError(BnfuseError):
    """An optional dependency is missing; the message names the extra to install."""

    exit_code = 4

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f'{package} is not installed; install it with: pip install "bnfuse[{extra}]"'
        )
        self.package = package
        self.extra = extra


class ValidationError(BnfuseError):
    """The fused model's outputs differ from the original's beyond tolerance.

    ``result`` carries the full :class:`~bnfuse.result.FuseResult` (validation metrics,
    the folds found responsible); nothing was written.
    """

    exit_code = 1

    def __init__(self, message: str, result: FuseResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class FusionInvariantError(BnfuseError):
    """A postcondition of the rewrite broke. This is a bug in bnfuse; please report it."""

    exit_code = 5

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(f"internal error (a bnfuse bug, please report it): {message}")
        self.context = context


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), at most
    ``limit`` characters, terminal colour codes removed: how a foreign error (protobuf,
    onnxruntime, TensorFlow) is quoted inside one of bnfuse's one-line messages."""
    text = str(exc).strip() or type(exc).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0].strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."
