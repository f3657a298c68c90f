"""ONNX as exporters write it: bnfuse vs onnxscript's optimizer (and the other peers).

Three models built in code (``benchmarks/models.py``, no downloads):

- ``dynamo_resnet18_56``: every Conv bias computed as torch's dynamo exporter writes it
  with ``optimize=False`` (``Expand(CastLike(Constant 0, x), Shape(W))``);
- ``keras_conv1d_net``: Keras Conv1D blocks as tf2onnx writes them
  (``Unsqueeze -> Transpose -> Conv -> Squeeze -> Mul -> Add``, and BNs after the ReLU
  before the next ``Unsqueeze -> Conv``);
- ``nhwc_convnet``: a Transpose to NHWC between each Conv and its per-channel Mul -> Add.

For each tool: BN-equivalents left (BatchNormalization nodes and Mul/Add BNs in disguise,
counted by :func:`bnfuse.onnx.count.count_affine_nodes`), the output's max abs error
against the original (onnxruntime, graph optimizations disabled, same random input), and
the median fold time of 3 runs (file -> file). The peer to match is onnxscript's optimizer
(``onnxscript.optimizer.optimize``, which folds constants and runs its default rewrite
rules); the other peers are called as in ``benchmarks/run.py``.

    python benchmarks/exporters.py            # writes RESULTS-exporters.md, RESULTS.md part
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import models as bench_models  # noqa: E402
from _common import ort_outputs, random_feeds  # noqa: E402
from _peers import TOOLS, quiet  # noqa: E402

from bnfuse.onnx.count import count_affine_nodes  # noqa: E402

RESULTS_MD = HERE / "RESULTS-exporters.md"
SUMMARY_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- exporters.py:begin -->", "<!-- exporters.py:end -->"


def run_onnxscript_optimizer(src: Path, dst: Path) -> None:
    from onnxscript import optimizer

    onnx.save(optimizer.optimize(onnx.load(str(src))), str(dst))


#: bnfuse first, then the peer to match, then the peers of run.py.
CONTENDERS: dict[str, Callable[[Path, Path], Any]] = {
    "bnfuse": TOOLS["bnfuse"],
    "onnxscript optimizer": run_onnxscript_optimizer,
}
for _name, _tool in TOOLS.items():
    if _name != "bnfuse":
        CONTENDERS["onnxscript rewriter" if _name == "onnxscript" else _name] = _tool


def _left(model: onnx.ModelProto) -> int:
    counts = count_affine_nodes(model)
    # a Mul -> Add pair is one BN: count BN-equivalents, not nodes
    return counts["BatchNormalization"] + (counts["affine"] + 1) // 2


def bench_model(name: str, work: Path, rounds: int) -> dict[str, dict[str, Any]]:
    model = bench_models.build(name)
    src = work / f"{name}.onnx"
    onnx.save(model, str(src))
    feeds = random_feeds(model, seed=0, batch=2)
    want = ort_outputs(src, feeds)
    rows: dict[str, dict[str, Any]] = {"original": {"left": _left(model)}}
    for tool, fn in CONTENDERS.items():
        dst = work / f"{name}.{tool.replace(' ', '_')}.onnx"
        times = []
        try:
            for _ in range(rounds):
                dst.unlink(missing_ok=True)
                t0 = time.perf_counter()
                with quiet():
                    fn(src, dst)
                times.append(time.perf_counter() - t0)
            out = onnx.load(str(dst))
            got = ort_outputs(dst, feeds)
            err = max(float(np.max(np.abs(a - b))) for a, b in zip(want, got, strict=True))
            rows[tool] = {"left": _left(out), "err": err, "ms": 1e3 * statistics.median(times)}
        except Exception as exc:  # a peer that fails is recorded, not fatal
            rows[tool] = {"failed": str(exc).splitlines()[0][:100] if str(exc) else repr(exc)}
    return rows


def render(results: dict[str, dict[str, dict[str, Any]]], date: str) -> list[str]:
    tools = list(CONTENDERS)
    lines = [
        "## ONNX as exporters write it (`benchmarks/exporters.py`)",
        "",
        f"Run {date}. BN-equivalents left (a Mul -> Add pair counts once) / max abs error vs "
        "the original (ORT_DISABLE_ALL) / median fold ms of 3. The peer to match is "
        "onnxscript's optimizer (`onnxscript.optimizer.optimize`).",
        "",
        "| model | BNs before | " + " | ".join(tools) + " |",
        "|---|---|" + "---|" * len(tools),
    ]
    for name, rows in results.items():
        cells = []
        for tool in tools:
            r = rows[tool]
            if "failed" in r:
                cells.append(f"failed: {r['failed']}")
            else:
                cells.append(f"{r['left']} / {r['err']:.1e} / {r['ms']:.0f}")
        lines.append(f"| {name} | {rows['original']['left']} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, rows in results.items():
        ours, peer = rows["bnfuse"], rows["onnxscript optimizer"]
        if "left" in ours and "left" in peer:
            verdict = "fewer" if ours["left"] < peer["left"] else "no more"
            ok = ours["left"] <= peer["left"]
            lines.append(
                f"- {name}: bnfuse leaves {ours['left']}, onnxscript's optimizer "
                f"{peer['left']} ({verdict if ok else 'MORE'})."
            )
    return lines


def update_summary(path: Path, section: list[str]) -> None:
    """Replace the text between this script's markers in ``path`` (append when absent)."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join([BEGIN, *section, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in bench_models.EXPORTER_MODELS:
            results[name] = bench_model(name, Path(tmp), args.rounds)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = render(results, date)
    print("\n".join(section))
    if not args.no_write:
        RESULTS_MD.write_text("# " + section[0][3:] + "\n" + "\n".join(section[1:]) + "\n")
        update_summary(SUMMARY_MD, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
