"""The one driver order (bnfuse/driver.py), and both backends following it."""

from __future__ import annotations

import ast
from pathlib import Path

from bnfuse.driver import fold_norm, sweep

PACKAGE = Path(__file__).resolve().parents[1] / "bnfuse"


def test_backward_first_forward_only_when_backward_did_not_fold() -> None:
    calls: list[str] = []

    def attempt(name: str, result: str) -> object:
        return lambda: calls.append(name) or result

    got = fold_norm(attempt("b", "fold"), attempt("f", "fold"), lambda r: r == "fold")
    assert (got, calls) == (["fold"], ["b"])
    calls.clear()
    got = fold_norm(attempt("b", "no"), attempt("f", "fold"), lambda r: r == "fold")
    assert (got, calls) == (["no", "fold"], ["b", "f"])
    calls.clear()
    got = fold_norm(attempt("b", "no"), None, lambda r: r == "fold")  # forward disabled
    assert (got, calls) == (["no"], ["b"])


def test_sweep_repeats_until_a_pass_folds_nothing() -> None:
    left = [3]

    def one_pass() -> bool:
        left[0] -= 1
        return left[0] > 0

    assert sweep(one_pass) == 3 and left == [0]
    assert sweep(lambda: False) == 1


def test_both_backends_call_the_one_driver() -> None:
    for rel in ("onnx/fuse.py", "keras/fuse.py"):
        tree = ast.parse((PACKAGE / rel).read_text(encoding="utf-8"))
        called = {
            n.func.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert {"fold_norm", "sweep"} <= called, rel
