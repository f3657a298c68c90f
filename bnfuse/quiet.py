"""Keep TensorFlow's start-up chatter (absl, oneDNN, CUDA lines) away from the user.

TensorFlow's C++ runtime writes to file descriptor 2 when it is imported and when it runs
its first op, whatever ``TF_CPP_MIN_LOG_LEVEL`` says about some of those lines (absl logs
"before absl::InitializeLog()" unconditionally). While a run needs TensorFlow and the user
did not ask for ``-v``, :func:`quiet_native_stderr` points descriptor 2 at a temporary
file and gives bnfuse a stream on the real stderr for its own lines.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO

__all__ = ["quiet_native_stderr", "quiet_tensorflow_env"]

#: environment TensorFlow reads at import: only errors from its C++ logging
_TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "ABSL_MIN_LOG_LEVEL": "2"}


def quiet_tensorflow_env() -> None:
    """Set TensorFlow's log-level variables unless the user set them (before its import)."""
    for key, value in _TF_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[IO[str]]:
    """Yield the stream bnfuse should write its own stderr lines to.

    When ``enabled``, descriptor 2 (where TensorFlow's C++ code, Python warnings and
    absl's Python logging end up) goes to a temporary file until the block ends, and the
    stream yielded is a duplicate of the original descriptor 2 (or ``sys.stderr`` itself
    when that is not descriptor 2, e.g. under a test runner that captures it). Child
    processes started inside the block inherit the silenced descriptor.
    """
    if not enabled:
        yield sys.stderr
        return
    quiet_tensorflow_env()
    try:
        own_fd = sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError):
        own_fd = False
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        user: IO[str] = (
            os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
            if own_fd
            else sys.stderr
        )
        try:
            yield user
        finally:
            with suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if user is not sys.stderr:
                user.close()
