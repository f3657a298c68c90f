"""The one driver algorithm: the order in which every backend tries its folds.

Both the ONNX pass (:func:`bnfuse.onnx.fuse.fuse_graph`) and the Keras pass
(:class:`bnfuse.keras.fuse._Pass`) call these two functions with their own callbacks, so
the same network ends the same way in its two forms (issue 13; the test
``tests/keras/test_keras_onnx_same_folds.py`` folds each sample Keras model and its ONNX
export and compares the folds).

The order:

1. **Per normalization, backward first, then forward** (:func:`fold_norm`). A backward
   fold into the producer touches one layer and needs only that the tensor between
   them has no other reader; a forward fold must take *every* consumer and is exact
   only without zero padding (or with a pure scale). So backward is the cheaper and
   more often exact choice, and it keeps the forward folds for the normalizations
   that have no producer to go into (a model's input, after an activation).
2. **Normalizations in graph order, swept until a sweep folds nothing**
   (:func:`sweep`). A fold can enable another (``Conv -> BN -> BN``: the second BN's
   producer is the Conv only once the first is folded; ``ReLU -> BN1 -> BN2 -> Conv``:
   BN1 folds forward once BN2 has), so a sweep that folded something is followed by
   another; the refusals are those of the last sweep (the final graph).

Why per normalization rather than "every backward fold first, then every forward one"
(the Keras driver's order before this module): the outcome of a normalization then
depends only on its neighbours at the time it is tried, in graph order, which is what
the ONNX pass, the report and the README describe; trying backward first globally gave
the same set of folds on every model the tests build, but a different sequence of edits
(and so of one-ulp roundings in ONNX, which rounds after each fold) on layers that take
a forward and a backward fold. Keras keeps float64 working copies and rounds once, so
the change of order does not change its numbers beyond float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["fold_norm", "sweep"]

A = TypeVar("A")


def fold_norm(
    backward: Callable[[], A],
    forward: Callable[[], A] | None,
    folded: Callable[[A], bool],
) -> list[A]:
    """Try one normalization: ``backward`` (into its producer), then, unless that
    ``folded`` or forward folding is off (``forward`` None), ``forward`` (into its
    consumers). Returns the attempts made, in order; the last one folded if any did."""
    first = backward()
    if folded(first) or forward is None:
        return [first]
    return [first, forward()]


def sweep(one_pass: Callable[[], bool]) -> int:
    """Run ``one_pass`` (try every normalization still standing once, in graph order,
    each with :func:`fold_norm`; True when it folded any) until a pass folds nothing.
    Returns the number of passes."""
    passes = 1
    while one_pass():
        passes += 1
    return passes
