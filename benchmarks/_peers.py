"""The contenders of ``benchmarks/run.py``: bnfuse and four peers, each run file -> file.

Every tool is called the way its documentation tells a user to fold BatchNormalization,
and every call does the same work: read the model file, transform it, write the result
file. A tool that raises is recorded by the caller as ``failed: <one line>``.

============== ==============================================================================
tool           call
============== ==============================================================================
bnfuse         ``bnfuse.fuse(src, dst, validate=False)`` (validation off: no peer validates)
onnxruntime    ``InferenceSession(src, so)`` with ``ORT_ENABLE_BASIC`` and
               ``so.optimized_model_filepath = dst`` (its Conv/BN fusions live at BASIC)
onnxoptimizer  ``onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"])``, ``onnx.save``
onnxslim       ``onnxslim.slim(src, dst)`` (default settings)
onnxscript     ``onnxscript.rewriter.rewrite(onnx.load(src))`` with its default rule set (which
               includes ``fuse_batchnorm_into_conv/conv_transpose/gemm``), ``onnx.save``
============== ==============================================================================
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import bnfuse_fold, ort_offline  # noqa: E402

__all__ = ["CALLS", "PEERS", "TOOLS", "quiet", "run_tool"]

Tool = Callable[[Path, Path], Any]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow what a tool prints on stdout/stderr (Python level) and its INFO logging."""
    was = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(was)


def run_onnxoptimizer(src: Path, dst: Path) -> None:
    import onnxoptimizer

    model = onnx.load(str(src))
    onnx.save(onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]), str(dst))


def run_onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    onnxslim.slim(str(src), str(dst))
    if not dst.exists():
        raise RuntimeError("onnxslim.slim wrote no file")


def run_onnxscript(src: Path, dst: Path) -> None:
    from onnxscript import rewriter

    model = onnx.load(str(src))
    onnx.save(rewriter.rewrite(model), str(dst))


#: Tool name -> file -> file callable; bnfuse first, then the peers.
TOOLS: dict[str, Tool] = {
    "bnfuse": bnfuse_fold,
    "onnxruntime": ort_offline,  # at its default level, ORT_ENABLE_BASIC
    "onnxoptimizer": run_onnxoptimizer,
    "onnxslim": run_onnxslim,
    "onnxscript": run_onnxscript,
}
PEERS: tuple[str, ...] = tuple(t for t in TOOLS if t != "bnfuse")

#: How each tool is called, for the report.
CALLS: dict[str, str] = {
    "bnfuse": "`bnfuse.fuse(src, dst, validate=False)`",
    "onnxruntime": "`InferenceSession(src, so)`, `so.graph_optimization_level = ORT_ENABLE_BASIC`, "
    "`so.optimized_model_filepath = dst`",
    "onnxoptimizer": '`onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)`',
    "onnxslim": "`onnxslim.slim(src, dst)` (defaults)",
    "onnxscript": "`onnx.save(onnxscript.rewriter.rewrite(onnx.load(src)), dst)` (default rules, "
    "which include fuse_batchnorm_into_conv / conv_transpose / gemm)",
}


def run_tool(name: str, src: Path, dst: Path) -> Any:
    """Run one tool file -> file with its chatter suppressed; returns what it returned."""
    with quiet():
        return TOOLS[name](src, dst)
