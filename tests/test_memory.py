"""Peak memory of a fold, measured in a fresh process (Linux: /proc/self/status).

The ONNX backend maps the input file, keeps its weights outside the ModelProto, computes
folded weights while writing them, runs onnxruntime from files and lets go of the mapped
pages it touched before onnxruntime loads a model. These bounds pin that: the way this
project used to work (every weight copied into protobuf, serialized to bytes for
onnxruntime) peaked at 2.4x the weights without validation and 3-4.7x with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx_util import GraphBuilder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset"
    ),
]

CHILD = r"""
import json, sys
import bnfuse, onnx, onnxruntime

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from here
res = bnfuse.fuse(sys.argv[1], sys.argv[2], validate=sys.argv[3] == "1", samples=2)
assert res.folds and (res.validation is None or res.validation.passed)
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


def _model(path: Path, external: bool) -> int:
    """Two 1024-channel 3x3 Conv -> BN blocks: 75.5 MB of float32 weights."""
    b = GraphBuilder(seed=0)
    y = b.input("x", ["N", 1024, 3, 3])
    for i in range(2):
        y = b.node("Relu", [b.bn(b.conv(y, 1024, 1024, [3, 3], pads=[1] * 4), 1024, name=f"bn{i}")])
    b.output(y)
    m = b.model()
    weights = sum(len(t.raw_data) for t in m.graph.initializer)
    onnx.save_model(
        m,
        str(path),
        save_as_external_data=external,
        location=f"{path.name}.data",
        size_threshold=1024,
    )
    return weights


def _peak_above_start(src: Path, out: Path, validate: bool) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), "1" if validate else "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(got["peak"]) - int(got["base"])


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
def test_peak_memory_stays_near_one_copy_of_the_weights(tmp_path: Path, external: bool) -> None:
    src = tmp_path / "m.onnx"
    weights = _model(src, external)
    fold = _peak_above_start(src, tmp_path / "f.onnx", validate=False) / weights
    validate = _peak_above_start(src, tmp_path / "v.onnx", validate=True) / weights
    # measured on a 2-core VM: fold 1.2x, validate 1.5x (external) - 1.8x (embedded); the
    # rest of the process (onnxruntime's arena, imports) adds a fixed ~30 MB on top
    assert fold < 1.6, f"fold peaked at {fold:.2f}x the weights"
    assert validate < 2.3, f"validation peaked at {validate:.2f}x the weights"
