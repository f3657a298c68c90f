"""bnfuse's modules form no import cycle, counting imports inside functions (a deferred
import hides a cycle from Python, not from the design: docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnfuse"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The bnfuse modules ``path`` imports anywhere (top level, functions, classes,
    ``if TYPE_CHECKING`` blocks): ``import a.b``, ``from a import b`` (b a module or a
    name in a), ``from . import x`` (relative)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a import b``: the module a.b if there is one, else a name in a
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for t in targets:
            # the deepest bnfuse module the name lies in (a.b.c -> a.b.c or a.b or a)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != me:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_bnfuse() -> None:
    graph = import_graph()
    assert "bnfuse.onnx.fuse" in graph and "bnfuse.onnx.affine" in graph["bnfuse.onnx.fuse"]
    # a package's __init__ importing its own submodules is not a cycle of the design
    # (``import bnfuse.x`` runs bnfuse/__init__ first); every other edge counts
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_deferred_import_cycle(tmp_path: Path) -> None:
    """The walker sees an import inside a function, and the finder reports the loop."""
    pkg = tmp_path / "bnfuse"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from bnfuse.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from bnfuse import a\n    return a\n")
    modules = {"bnfuse", "bnfuse.a", "bnfuse.b"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        graph = {module_name(p): imports_of(p, modules) for p in sorted(pkg.rglob("*.py"))}
    finally:
        PACKAGE = saved
    assert graph == {"bnfuse": set(), "bnfuse.a": {"bnfuse.b"}, "bnfuse.b": {"bnfuse.a"}}
    assert find_cycle(graph) == ["bnfuse.a", "bnfuse.b", "bnfuse.a"]


STORAGE = "bnfuse.onnx.storage"


def test_onnx_storage_is_reached_through_its_package_only() -> None:
    """wire, payloads, external, serialize and files are the storage package's inside:
    every other bnfuse module imports only ``bnfuse.onnx.storage`` itself (one load/save
    interface; docs/architecture.md)."""
    graph = import_graph()
    inside = {m for m in graph if m.startswith(STORAGE + ".")}
    assert {f"{STORAGE}.{m}" for m in ("wire", "payloads", "external", "serialize")} <= inside
    leaks = sorted(
        f"{m} imports {n}"
        for m, deps in graph.items()
        if m != STORAGE and not m.startswith(STORAGE + ".")
        for n in deps & inside
    )
    assert not leaks, leaks
    users = {m for m, deps in graph.items() if STORAGE in deps and not m.startswith(STORAGE)}
    assert {"bnfuse.onnx.backend", "bnfuse.onnx.graph", "bnfuse.onnx.fuse"} <= users
