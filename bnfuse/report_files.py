"""Report files: the suffix decides the format (Markdown, JSON, one self-contained HTML
page); every file is written atomically. The renderers live in :mod:`bnfuse.report`
(terminal, Markdown, JSON) and :mod:`bnfuse.report_html` (HTML, imported only for
``.html``: it needs the ``html`` extra)."""

from __future__ import annotations

import os
from pathlib import Path

from bnfuse import report
from bnfuse.backend import atomic_path
from bnfuse.errors import UsageError
from bnfuse.options import REPORT_SUFFIXES as _REPORT_FORMATS
from bnfuse.options import report_format, require_html_extra
from bnfuse.result import FuseResult

__all__ = ["REPORT_SUFFIXES", "check_report_path", "write_report"]

REPORT_SUFFIXES = tuple(_REPORT_FORMATS)  # .md, .markdown, .json, .html


def check_report_path(path: str | os.PathLike[str]) -> None:
    """Refuse a report file name bnfuse cannot write, before any work is done.

    Raises:
        UsageError: a suffix other than :data:`REPORT_SUFFIXES`.
        MissingDependencyError: ``.html`` without the ``html`` extra (matplotlib).
    """
    dest = Path(path)
    kind = report_format(dest)
    if kind is None:
        raise UsageError(f"--report {dest}: use a .md, .json or .html file name")
    if kind == "html":
        require_html_extra()


def write_report(result: FuseResult, path: str | os.PathLike[str]) -> None:
    """Write the report to ``path``: Markdown for ``.md``, JSON for ``.json``, a
    self-contained page for ``.html`` (:mod:`bnfuse.report_html`); atomically.

    Raises:
        UsageError: another suffix, or the directory does not exist.
        MissingDependencyError: ``.html`` without the ``html`` extra.
    """
    dest = Path(path)
    suffix = dest.suffix.lower()
    check_report_path(dest)
    if suffix in (".md", ".markdown"):
        content = report.to_markdown(result)
    elif suffix == ".json":
        content = report.to_json(result) + "\n"
    else:
        from bnfuse.report_html import to_html

        content = to_html(result)
    if not dest.parent.is_dir():
        raise UsageError(f"--report {dest}: directory {dest.parent} does not exist")
    if dest.is_dir():
        raise UsageError(f"--report {dest}: is a directory")
    with atomic_path(dest) as tmp:
        tmp.write_text(content, encoding="utf-8")
