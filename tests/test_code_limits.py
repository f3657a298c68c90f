"""Size limits that keep bnfuse's modules and functions readable (docs/architecture.md):
no source file in bnfuse/ or benchmarks/ over 800 lines, no function over 100 lines, no function with
more than 12 positional parameters (past that, callers swap arguments silently: pass
an options object or keywords). Checked with ``ast``, so they hold from now on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bnfuse"

MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 100
MAX_POSITIONAL = 12

SOURCES = sorted(PACKAGE.rglob("*.py"))
BENCHMARKS = sorted((ROOT / "benchmarks").rglob("*.py"))


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def positional(f: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters a caller may pass by position (``self`` included; ``*args`` not)."""
    return len(f.args.posonlyargs) + len(f.args.args)


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """Every limit ``path`` breaks, one line each (named relative to ``root``)."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    found = []
    lines = len(text.splitlines())
    if lines > MAX_FILE_LINES:
        found.append(f"{rel}: {lines} lines (at most {MAX_FILE_LINES})")
    for f in functions(ast.parse(text, str(path))):
        length = (f.end_lineno or f.lineno) - f.lineno + 1
        if length > MAX_FUNCTION_LINES:
            found.append(
                f"{rel}:{f.lineno} {f.name}: {length} lines (at most {MAX_FUNCTION_LINES})"
            )
        if positional(f) > MAX_POSITIONAL:
            found.append(
                f"{rel}:{f.lineno} {f.name}: {positional(f)} positional parameters "
                f"(at most {MAX_POSITIONAL})"
            )
    return found


def test_sources_found() -> None:
    assert len(SOURCES) > 40 and PACKAGE / "plan.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_and_function_limits(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_file_length(path: Path) -> None:
    """benchmarks/ is held to the file limit (its scripts' long table builders are not
    held to the function limits of the package)."""
    assert len(BENCHMARKS) > 10
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)}: {lines} lines"


def test_the_check_catches_each_limit(tmp_path: Path) -> None:
    """Each limit fails on a file that breaks it (the check itself can fail)."""
    long_fn = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    many = (
        "def g(" + ", ".join(f"a{i}" for i in range(MAX_POSITIONAL + 1)) + ", *, k=1):\n    pass\n"
    )
    ok = "def h(" + ", ".join(f"a{i}" for i in range(MAX_POSITIONAL)) + ", *rest, k=1):\n    pass\n"
    path = tmp_path / "m.py"
    path.write_text(long_fn + many + ok + "\n" * MAX_FILE_LINES, encoding="utf-8")
    found = violations(path, tmp_path)
    assert [v.split(" ", 1)[0] for v in found] == ["m.py:", "m.py:1", "m.py:102"], found
    assert f"f: {MAX_FUNCTION_LINES + 1} lines" in found[1]
    assert f"g: {MAX_POSITIONAL + 1} positional" in found[2]
