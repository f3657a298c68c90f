"""A pytest plugin (``-p refusal_recorder``) that records every Refusal bnfuse creates
during the run, as JSON ``[[reason, code], ...]`` in the file named by the environment
variable ``BNFUSE_RECORD_REFUSALS``. tests/test_reasons.py runs the fold tests under it."""

from __future__ import annotations

import json
import os
from typing import Any

import bnfuse.result

_SEEN: list[tuple[str, str]] = []
_INIT = bnfuse.result.Refusal.__init__


def _recording_init(self: bnfuse.result.Refusal, *args: Any, **kwargs: Any) -> None:
    _INIT(self, *args, **kwargs)
    _SEEN.append((self.reason, self.code))


bnfuse.result.Refusal.__init__ = _recording_init  # type: ignore[method-assign]


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("BNFUSE_RECORD_REFUSALS")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sorted(set(_SEEN)), f, indent=1)
