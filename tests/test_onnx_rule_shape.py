"""Every ONNX rule has the one shape of bnfuse/onnx/rulebase.py, and the layout math
exists once: in the planning core (bnfuse/plan.py) and bnfuse/fold.py, not in a rule."""

from __future__ import annotations

import ast
from pathlib import Path

from bnfuse.onnx import rules
from bnfuse.onnx.backward import BackwardRule
from bnfuse.onnx.forward import ForwardRule
from bnfuse.onnx.fuse import RULE_NAMES
from bnfuse.onnx.rulebase import Rule

ONNX = Path(__file__).resolve().parents[1] / "bnfuse" / "onnx"


def test_every_rule_has_the_one_shape() -> None:
    names = [r.name for r in rules.RULES]
    assert len(set(names)) == len(names) and all(names)
    assert set(names) < set(RULE_NAMES)
    for rule in rules.RULES:
        assert isinstance(rule, Rule), rule
        for method in ("match", "check", "prepare"):
            assert getattr(type(rule), method) is not getattr(Rule, method), (rule.name, method)
        assert type(rule).rewrite is Rule.rewrite, rule.name  # prepare, then write
        assert rule.__doc__, rule.name
    assert all(isinstance(r, BackwardRule) and r.direction == "backward" for r in rules.BACKWARD)
    assert all(isinstance(r, ForwardRule) and r.direction == "forward" for r in rules.FORWARD)
    assert rules.RULES == rules.BACKWARD + rules.FORWARD


def test_no_rule_module_does_the_core_s_work() -> None:
    """Channel maps, folds and refusal wordings of the core are called only by the core:
    an ONNX module that builds its own would be a second copy of the layout math."""
    core_only = {"channel_map", "fold_backward", "fold_forward", "PADDING", "TRANSPOSE_SHIFT"}
    for path in sorted(ONNX.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        imported = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            for a in n.names
        }
        found = core_only & (used | imported)
        if path.name == "rules.py":  # re-exports PADDING as PAD_REASON for callers
            found -= {"PADDING"}
        assert not found, (path.name, found)
