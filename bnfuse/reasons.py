"""One table of refusal reasons: a stable code for every reason a normalization stays.

Pipelines filter refusals on :attr:`bnfuse.result.Refusal.code` (kebab-case, stable
within ``bnfuse.result/1``), not on the readable sentence, whose wording may improve.

How a refusal gets its code: the driver that creates the :class:`~bnfuse.result.Refusal`
calls :func:`refusal` (or passes ``code=`` itself). A rule may tag its reason with a code
(:func:`tagged`); an untagged reason is classified by :data:`WORDINGS`, an ordered table
of the phrases bnfuse's reasons are written with (the first match wins). A reason no
phrase matches gets ``other``; the test suite checks that none of its models' refusals
does, so a new wording comes with its row here.

Wordings that several backends use live here once (:data:`PADDING`, :data:`EXCLUDED`,
:data:`TRANSPOSE_SHIFT`): one reason, one sentence, whatever the model format.
"""

from __future__ import annotations

import re

from bnfuse.result import Refusal

__all__ = [
    "CODES",
    "EXCLUDED",
    "PADDING",
    "TRANSPOSE_SHIFT",
    "WORDINGS",
    "Reason",
    "code_for",
    "overflow",
    "refusal",
    "tagged",
]

#: Every code, with what it means (docs/report-schema.md shows this table).
CODES: dict[str, str] = {
    "shared-output": "the tensor between the layer and the BN has other consumers, or is a "
    "model/graph output, or a layer is shared by several call sites",
    "activation-between": "a non-linear activation sits between the layer and the BN",
    "axis-mismatch": "the BN's axis or channel count is not the layer's channel axis or "
    "count (or a reshape in between cannot be proven to keep it)",
    "padding": "the layer after the BN pads its input with zeros (or spreads a constant "
    "unevenly at its borders): a BN shift cannot cross it",
    "not-constant": "a weight or BN parameter is not a constant (a graph input, computed, "
    "missing or overridable)",
    "training-mode": "the BN runs in training mode (batch statistics)",
    "unsafe-statistics": "the BN statistics or affine constants are not finite, or the "
    "variance makes the BN undefined",
    "overflow": "the folded values overflow the weights' dtype",
    "excluded": "kept unfolded by the caller (--keep), or rolled back after failing validation",
    "unsupported-layer": "the layer or node cannot be rewritten (malformed, quantized, "
    "LoRA, a subclass, opaque internals, an attribute taken from a function call site)",
    "no-partner": "no linear layer before or after the BN to fold into",
    "dtype": "the weight is not a floating-point tensor",
    "rule-skipped": "the rule that would fold it was disabled (--skip, --no-forward)",
    "other": "a reason not in this table",
}

PADDING = "zero padding after BN: fold would change the borders"
EXCLUDED = "excluded (rolled back)"
TRANSPOSE_SHIFT = (
    "BN shift before a transposed convolution: its border outputs sum fewer kernel taps, "
    "so the shift cannot become a bias (only a pure scale folds)"
)


class Reason(str):
    """A reason sentence that carries its code (a ``str``, so every caller that only
    reads the text is unchanged)."""

    code: str

    def __new__(cls, code: str, text: str) -> Reason:
        if code not in CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        obj = super().__new__(cls, text)
        obj.code = code
        return obj


def overflow(layer: str, exc: OverflowError) -> Reason:
    """The refusal of a fold into ``layer`` whose values overflow the weights' dtype
    (``exc`` from :func:`bnfuse.fold.round_to`, which names the dtype)."""
    dtype = getattr(exc, "dtype", None)
    what = f"overflow {dtype}" if isinstance(dtype, str) else str(exc)
    return Reason("overflow", f"folded values of {layer!r} {what} (fold refused)")


def tagged(code: str, text: str) -> Reason:
    """``text`` tagged with ``code`` (one of :data:`CODES`)."""
    return Reason(code, text)


#: (code, pattern) in the order they are tried against a reason's text. Order matters
#: where a sentence names two things: a combined Keras reason ("no linear layer next to
#: BN (before: ...; after: ...)") is no-partner whatever its parts say.
WORDINGS: tuple[tuple[str, str], ...] = (
    ("excluded", r"^excluded\b|^kept unfolded: matches --keep"),
    ("no-partner", r"^no linear layer|not Gemm/MatMul$|output has no consumer$"),
    ("rule-skipped", r"\brule \S+ is disabled|forward folding is disabled"),
    ("training-mode", r"training mode|training outputs|training=True"),
    ("overflow", r"overflow"),
    ("activation-between", r"activation between"),
    ("padding", r"zero padding after BN|BN shift before a transposed convolution"),
    ("dtype", r"is not a floating-point tensor"),
    (
        "unsafe-statistics",
        r"variance \+ epsilon|non-finite|not finite|Div by a constant that contains 0",
    ),
    (
        "not-constant",
        r"not a constant|is computed by|is a (graph|function) input|also listed as a graph "
        r"input|missing input|is not defined",
    ),
    (
        "shared-output",
        r"has other consumers|is a graph output|is (also )?a model output|also used by other "
        r"layers|shared by several call sites|output also feeds|has several outputs|"
        r"takes several inputs|^not every layer after BN can take it: .*is not a linear layer",
    ),
    (
        "unsupported-layer",
        r"^malformed|cannot read the graph|inside layer|subclass of BatchNormalization|"
        r"quantized|LoRA enabled|from the enclosing function's call site|has no weight|"
        r"is not 2-D|-D, not 2-D|group=|feeds \S+ '.*' as (a|its) weight|"
        r"is not a linear layer|not followed by Dense",
    ),
    (
        "axis-mismatch",
        r"axis|axes|channels? (count|but)|channel count|features but|not per output channel|"
        r"per.channel|different lengths|rank|feature order|[Ff]latten|Reshape|broadcast|"
        r"input shape of|transposes its input",
    ),
)

_COMPILED = tuple((code, re.compile(pattern)) for code, pattern in WORDINGS)


def code_for(reason: str) -> str:
    """The code of a reason: its tag, else the first :data:`WORDINGS` row it matches,
    else ``other``."""
    code = getattr(reason, "code", None)
    if isinstance(code, str) and code in CODES:
        return code
    for code, pattern in _COMPILED:
        if pattern.search(reason):
            return code
    return "other"


def refusal(
    bn: str,
    reason: str,
    *,
    kind: str = "BatchNormalization",
    rule: str = "",
    scope: str = "",
    code: str | None = None,
) -> Refusal:
    """A :class:`~bnfuse.result.Refusal` with its code (``code``, else :func:`code_for`)."""
    if code is not None and code not in CODES:
        raise ValueError(f"unknown refusal code {code!r}")
    return Refusal(
        bn=bn,
        reason=str(reason),
        kind=kind,
        rule=rule,
        scope=scope,
        code=code if code is not None else code_for(reason),
    )
