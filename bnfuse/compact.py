"""The terminal's view of the normalizations: one screen by default, every BN with its full
name under ``-v``.

By default folded BNs are summed up by direction and rule, and those left in place are
grouped by reason (code when the refusal has one) with their count and a few names: a
model with 121 BNs fits a screen. ``-v`` lists every BN on its own line with its full
name: plain text, never cut with "…" to fit the terminal's width (a long line is the
terminal's to wrap). Markdown, JSON and the report files always hold every BN.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from bnfuse.result import FuseResult

__all__ = ["NAMES_SHOWN", "REASONS_SHOWN", "aligned", "bn_lines", "compact_latency"]

NAMES_SHOWN = 3  # names shown per group of refusals
REASONS_SHOWN = 6  # groups of refusals shown before "... more"
_REASON_CHARS = 90  # a reason's text in a grouped line (names are never shortened)
_NAME_CHARS = 100  # a second or third name is shown only within this many characters

Line = tuple[str, str]  # (text, rich style)


def aligned(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Rows as lines of space-padded columns; nothing is ever cut."""
    right = frozenset(right)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _rolled(result: FuseResult) -> tuple[set[str], set[str]]:
    v = result.validation
    return (set(v.culprits) if v else set()), (set(v.rolled_back) if v else set())


def _title(result: FuseResult) -> Line:
    _, rolled = _rolled(result)
    extra = len(rolled - {r.bn for r in result.refusals} - {f.bn for f in result.folds})
    left = len(result.refusals) + extra
    if not result.folds and not left:
        return ("Normalizations", "bold")
    return (f"Normalizations: {len(result.folds)} folded, {left} left in place", "bold")


def _short(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _names(names: Sequence[str]) -> str:
    """Up to NAMES_SHOWN full names, fewer when they are long (at least one)."""
    shown: list[str] = []
    for name in names[:NAMES_SHOWN]:
        if shown and sum(len(n) + 2 for n in shown) + len(name) > _NAME_CHARS:
            break
        shown.append(name)
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _grouped(result: FuseResult) -> list[Line]:
    culprits, rolled = _rolled(result)
    lines: list[Line] = []
    by_rule = Counter((f.direction, f.rule) for f in result.folds)
    rows = [
        (str(n), f"folded {direction}", f"by {rule}")
        for (direction, rule), n in sorted(by_rule.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    lines += [("  " + t, "green") for t in aligned(rows, right={0})] if rows else []
    failed = [f.bn for f in result.folds if f.bn in culprits]
    if failed:
        lines.append((f"  FAILED validation: {_names(failed)}", "bold red"))
    groups: dict[str, list[Any]] = {}
    for r in result.refusals:
        key = "rolled back" if r.bn in rolled else (getattr(r, "code", "") or r.reason)
        groups.setdefault(key, []).append(r)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for key, members in ranked[:REASONS_SHOWN]:
        code = getattr(members[0], "code", "")
        reason = "its fold failed validation" if key == "rolled back" else members[0].reason
        label = f"[{code}] " if code and key != "rolled back" else ""
        if key != "rolled back" and len({m.reason for m in members}) > 1:
            reason += ", ..."  # one code, several wordings: the first stands for them
        what = "rolled back" if key == "rolled back" else "left"
        names = _names([m.bn for m in members])
        lines.append(
            (f"  {len(members)} {what}: {label}{_short(reason)}: {names}", "yellow")
        )  # fmt: skip
    hidden = ranked[REASONS_SHOWN:]
    if hidden:
        n = sum(len(m) for _, m in hidden)
        lines.append((f"  {n} left for {len(hidden)} other reason(s)", "yellow"))
    if len(result.folds) + len(result.refusals) > 0:
        lines.append(("  (-v lists every BN; --report FILE.md / --json hold them all)", "dim"))
    return lines


def _every_bn(result: FuseResult) -> list[Line]:
    culprits, rolled = _rolled(result)
    has_scope = any(f.scope for f in result.folds) or any(r.scope for r in result.refusals)
    rows: list[list[str]] = []
    styles: list[str] = []
    for f in result.folds:
        bad = f.bn in culprits
        status = f"folded {f.direction}" + (", FAILED validation" if bad else "")
        detail = f"into {f.into}" + (f" ({f.detail})" if f.detail else "")
        rows.append([f.bn, f.kind, status, f.rule, f.scope or "main", str(f.channels), detail])
        styles.append("bold red" if bad else "green")
    for r in result.refusals:
        back = r.bn in rolled
        status = "rolled back" if back else "refused"
        code = getattr(r, "code", "")
        reason = "its fold failed validation" if back else r.reason
        reason = f"[{code}] {reason}" if code and not back else reason
        rows.append([r.bn, r.kind, status, r.rule, r.scope or "main", "", reason])
        styles.append("bold yellow" if back else "yellow")
    header = ["BN", "kind", "result", "rule", "scope", "channels", "into / reason"]
    if not has_scope:
        header.pop(4)
        for row in rows:
            row.pop(4)
    texts = aligned([header, *rows], right={len(header) - 2})
    return [(texts[0], "bold"), *zip(texts[1:], styles, strict=True)]


def bn_lines(result: FuseResult, verbose: bool) -> list[Line]:
    """The normalizations part of the terminal report, as (text, style) lines."""
    lines = [_title(result)]
    if not result.folds and not result.refusals:
        return [*lines, ("no BatchNormalization (or BN-equivalent affine) found", "yellow")]
    return lines + (_every_bn(result) if verbose else _grouped(result))


def compact_latency(sections: list[Any]) -> list[Any]:
    """Terminal, default view: the "One-off costs" table becomes one line under the
    latency table (setup and first-run times; ``-v`` shows the table)."""
    out: list[Any] = []
    for sec in sections:
        if sec.title == "One-off costs" and out:
            parts = [f"{row[0].text} {row[1].text} ms" for row in sec.rows]
            out[-1].lines.append(("one-off: " + ", ".join(parts), "dim"))
            continue
        out.append(sec)
    return out
