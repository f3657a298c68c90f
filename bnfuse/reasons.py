"""One table of refusal reasons: a stable code for every reason a normalization stays.

Pipelines filter refusals on :attr:`bnfuse.result.Refusal.code` (kebab-case, stable
within ``bnfuse.result/1``), not on the readable sentence, whose wording may improve.

How a refusal gets its code: where a reason is made, it is made with its code, a
:class:`Reason` (:func:`tagged`, or a wording of this module: :func:`overflow`,
:data:`PADDING`, ...); a sentence that says a reason with more context keeps its code
(:meth:`Reason.reworded`), one that joins several takes the weightiest of theirs
(:meth:`Reason.joined`, by :data:`PRECEDENCE`). The driver that creates the
:class:`~bnfuse.result.Refusal` calls :func:`refusal`, which takes only a :class:`Reason`
(mypy checks it) and copies its code. Nothing classifies the text afterwards: an
untagged sentence would get ``other`` (:func:`code_for`), and the test suite checks that
no refusal of its models does and that every one came from a tagged reason.

Wordings that several backends use live here once (:data:`PADDING`, :data:`EXCLUDED`,
:data:`TRANSPOSE_SHIFT`): one reason, one sentence, whatever the model format.
"""

from __future__ import annotations

from bnfuse.result import Refusal

__all__ = [
    "CODES",
    "EXCLUDED",
    "PADDING",
    "PRECEDENCE",
    "TRANSPOSE_SHIFT",
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

    def reworded(self, text: str) -> Reason:
        """``text`` (a sentence that says this reason with more context) with this
        reason's code."""
        return Reason(self.code, text)

    @staticmethod
    def joined(text: str, *parts: Reason) -> Reason:
        """``text``, a sentence that joins several reasons, with the code of the part
        that weighs most (:data:`PRECEDENCE`)."""
        return Reason(min((p.code for p in parts), key=PRECEDENCE.index), text)


def tagged(code: str, text: str) -> Reason:
    """``text`` tagged with ``code`` (one of :data:`CODES`)."""
    return Reason(code, text)


PADDING = tagged("padding", "zero padding after BN: fold would change the borders")
EXCLUDED = tagged("excluded", "excluded (rolled back)")
TRANSPOSE_SHIFT = tagged(
    "padding",
    "BN shift before a transposed convolution: its border outputs sum fewer kernel taps, "
    "so the shift cannot become a bias (only a pure scale folds)",
)


def overflow(layer: str, exc: OverflowError) -> Reason:
    """The refusal of a fold into ``layer`` whose values overflow the weights' dtype
    (``exc`` from :func:`bnfuse.fold.round_to`, which names the dtype)."""
    dtype = getattr(exc, "dtype", None)
    what = f"overflow {dtype}" if isinstance(dtype, str) else str(exc)
    return Reason("overflow", f"folded values of {layer!r} {what} (fold refused)")


#: The codes in the order of their weight, for a sentence that joins several reasons
#: (:meth:`Reason.joined`): the first a part has names the whole. What the caller chose
#: or can change (a kept BN, a skipped rule, training mode, a dtype that overflows)
#: comes before what the layers are; an axis mismatch, which the other side of a BN
#: often shares, weighs least.
PRECEDENCE: tuple[str, ...] = (
    "excluded",
    "no-partner",
    "rule-skipped",
    "training-mode",
    "overflow",
    "activation-between",
    "padding",
    "dtype",
    "unsafe-statistics",
    "not-constant",
    "shared-output",
    "unsupported-layer",
    "axis-mismatch",
    "other",
)


def code_for(reason: str) -> str:
    """The code of a reason: its tag, else ``other`` (an untagged sentence, a bug the
    test suite looks for)."""
    code = getattr(reason, "code", None)
    return code if isinstance(code, str) and code in CODES else "other"


def refusal(
    bn: str,
    reason: Reason,
    *,
    kind: str = "BatchNormalization",
    rule: str = "",
    scope: str = "",
) -> Refusal:
    """A :class:`~bnfuse.result.Refusal` of ``bn``, with the code of its ``reason`` (the
    result holds the plain sentence)."""
    return Refusal(
        bn=bn, reason=str(reason), kind=kind, rule=rule, scope=scope, code=code_for(reason)
    )
