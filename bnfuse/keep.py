"""``--keep PATTERN``: BNs the user wants left unfolded, matched by glob on their names.

Both backends ask :func:`kept_by` before trying a BN; a match becomes a refusal with code
``excluded`` and a reason naming the pattern.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from bnfuse.reasons import Reason, tagged

__all__ = ["kept_by", "kept_reason"]


def kept_by(names: Sequence[str], patterns: Sequence[str]) -> str | None:
    """The first pattern matching one of ``names`` (a BN's name and, inside a nested
    model or subgraph, its scoped path), or None. Matching is case-sensitive."""
    for pattern in patterns:
        if any(fnmatchcase(name, pattern) for name in names if name):
            return pattern
    return None


def kept_reason(pattern: str) -> Reason:
    """The refusal reason of a BN kept by ``pattern``."""
    return tagged("excluded", f"kept unfolded: matches --keep {pattern!r}")
