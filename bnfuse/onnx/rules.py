"""The ONNX fold rules, listed once, in the order the driver tries them.

Every rule has the one shape of :mod:`bnfuse.onnx.rulebase` (``match`` / ``check`` /
``prepare`` / ``rewrite``). They live in :mod:`bnfuse.onnx.backward` (a linear producer,
then the normalization), :mod:`bnfuse.onnx.forward` (the normalization, then a linear
consumer) and :mod:`bnfuse.onnx.layout` (either, through layout ops, by delegating to
the former); the normalizations they fold are :mod:`bnfuse.onnx.norm`'s.
"""

from __future__ import annotations

from bnfuse.onnx.backward import (
    BACKWARD_RULES,
    BackwardRule,
    ConvBN,
    ConvTransposeBN,
    GemmBN,
    MatMulBN,
)
from bnfuse.onnx.forward import FORWARD_RULES, BNConv, BNGemm, ForwardRule
from bnfuse.onnx.layout import LAYOUT_BACKWARD_RULES, LAYOUT_FORWARD_RULES
from bnfuse.onnx.norm import ELEMENTWISE, Norm, bn_norm
from bnfuse.onnx.rulebase import BackwardMatch, ForwardMatch, Rule
from bnfuse.reasons import PADDING

__all__ = [
    "BACKWARD",
    "BACKWARD_RULES",
    "ELEMENTWISE",
    "FORWARD",
    "FORWARD_RULES",
    "RULES",
    "BNConv",
    "BNGemm",
    "BackwardMatch",
    "BackwardRule",
    "ConvBN",
    "ConvTransposeBN",
    "ForwardMatch",
    "ForwardRule",
    "GemmBN",
    "MatMulBN",
    "Norm",
    "Rule",
    "bn_norm",
]

#: Backward rules in the order tried: layout-bn last (it delegates to the others).
BACKWARD: tuple[BackwardRule, ...] = BACKWARD_RULES + LAYOUT_BACKWARD_RULES
#: Forward rules in the order tried: layout-forward first (bn-gemm claims any Reshape).
FORWARD: tuple[ForwardRule, ...] = LAYOUT_FORWARD_RULES + FORWARD_RULES
#: Every ONNX rule, by name in ``--skip``.
RULES: tuple[BackwardRule | ForwardRule, ...] = BACKWARD + FORWARD

PAD_REASON = PADDING  # one wording for every backend (bnfuse/reasons.py)
