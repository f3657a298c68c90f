"""A pytest plugin (``-p refusal_recorder``) that records every Refusal created during
the run, as JSON ``[[reason, code, tagged], ...]`` in the file named by the environment
variable ``BNFUSE_RECORD_REFUSALS``. tests/test_reasons.py runs the fold tests under it.

``tagged`` says where the refusal came from: true only when :func:`bnfuse.reasons.refusal`
made it from a :class:`bnfuse.reasons.Reason` whose code the refusal carries. A plain
sentence passed to ``refusal`` (it would get ``other``), or a ``Refusal`` built directly
(with whatever code its caller chose), records false."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import bnfuse.reasons
import bnfuse.result

_SEEN: list[tuple[str, str, bool]] = []
_INIT = bnfuse.result.Refusal.__init__
_REFUSAL_CODE = bnfuse.reasons.refusal.__code__


def _recording_init(self: bnfuse.result.Refusal, *args: Any, **kwargs: Any) -> None:
    _INIT(self, *args, **kwargs)
    caller = sys._getframe(1)  # the frame that called Refusal(...)
    reason = caller.f_locals.get("reason") if caller.f_code is _REFUSAL_CODE else None
    tagged = isinstance(reason, bnfuse.reasons.Reason) and reason.code == self.code
    _SEEN.append((self.reason, self.code, tagged))


bnfuse.result.Refusal.__init__ = _recording_init  # type: ignore[method-assign]


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("BNFUSE_RECORD_REFUSALS")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sorted(set(_SEEN)), f, indent=1)
