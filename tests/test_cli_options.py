"""CLI options no other test passed (--atol, --seed, --no-forward, -v) and the exit codes
of a missing extra (4) and of an internal error (5), with and without BNFUSE_DEBUG=1.

Each test asserts the option's effect, so a CLI that drops an option or passes it in the
wrong place (rtol as atol, say) fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
from onnx_util import GraphBuilder, count_ops
from typer.testing import CliRunner

from bnfuse.cli import app

runner = CliRunner()


def backward_and_forward_model(path: Path) -> Path:
    """bn_back folds backward (after a Conv); bn_fwd only forward (Relu before it, an
    unpadded Conv after it)."""
    b = GraphBuilder(seed=31)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn_back")
    y = b.bn(b.node("Relu", [y]), 4, name="bn_fwd")
    b.output(b.conv(y, 4, 2, [3, 3]))
    onnx.save(b.model(), path)
    return path


def run_json(*args: str) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    data: dict = json.loads(r.stdout)
    return data


def test_atol_and_rtol_each_reach_validation(tmp_path: Path) -> None:
    src = backward_and_forward_model(tmp_path / "m.onnx")
    data = run_json(str(src), "--atol", "0.25", "--rtol", "0.002")
    outs = data["validation"]["outputs"]
    assert outs and [(o["atol"], o["rtol"]) for o in outs] == [(0.25, 0.002)] * len(outs)


def test_seed_chooses_the_random_inputs(tmp_path: Path) -> None:
    src = backward_and_forward_model(tmp_path / "m.onnx")
    a = run_json(str(src), "--seed", "7", "--samples", "2")
    b = run_json(str(src), "--seed", "8", "--samples", "2")
    again = run_json(str(src), "--seed", "7", "--samples", "2")
    assert a["validation"]["input_source"] == "random (seed 7, 2 samples)"
    assert b["validation"]["input_source"] == "random (seed 8, 2 samples)"
    err = [d["validation"]["outputs"][0]["mean_abs_error"] for d in (a, b, again)]
    assert err[0] == err[2]  # same seed, same inputs, same errors
    assert err[0] != err[1]  # another seed, other inputs


def test_no_forward_leaves_the_forward_only_bn(tmp_path: Path) -> None:
    src = backward_and_forward_model(tmp_path / "m.onnx")
    both = run_json(str(src))
    assert sorted((f["bn"], f["direction"]) for f in both["folds"]) == [
        ("bn_back", "backward"),
        ("bn_fwd", "forward"),
    ]
    out = tmp_path / "f.onnx"
    back = run_json(str(src), "--no-forward", "-o", str(out))
    assert [(f["bn"], f["direction"]) for f in back["folds"]] == [("bn_back", "backward")]
    assert [r["bn"] for r in back["refusals"]] == ["bn_fwd"]
    assert count_ops(onnx.load(out), "BatchNormalization") == 1


def test_verbose_adds_detail_columns(tmp_path: Path) -> None:
    src = backward_and_forward_model(tmp_path / "m.onnx")
    plain = runner.invoke(app, [str(src)])
    verbose = runner.invoke(app, [str(src), "-v"])
    assert plain.exit_code == 0 and verbose.exit_code == 0, plain.output + verbose.output
    for header in ("channels", "mean abs"):
        assert header in verbose.output
        assert header not in plain.output
    fwd_row = next(line for line in verbose.output.splitlines() if line.startswith("bn_fwd"))
    assert "folded forward" in fwd_row and " 4 " in fwd_row  # its channel count


def _cli(code: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the bnfuse CLI in a fresh interpreter after ``code`` (which sets up a fault)."""
    script = f"import sys\n{code}\nfrom bnfuse.cli import main\nsys.argv = ['bnfuse', *sys.argv[1:]]\nmain()\n"
    env = {k: v for k, v in os.environ.items() if k != "BNFUSE_DEBUG"}
    if debug:
        env["BNFUSE_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=False
    )


def test_missing_extra_exits_4(tmp_path: Path) -> None:
    src = tmp_path / "m.keras"
    with zipfile.ZipFile(src, "w") as z:  # a .keras zip: passes the check made before TF
        z.writestr("metadata.json", '{"keras_version": "3.5.0"}')
        z.writestr("config.json", "{}")
    # an interpreter where keras and tensorflow cannot be imported
    r = _cli("sys.modules['keras'] = None\nsys.modules['tensorflow'] = None", str(src))
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("bnfuse: error: ")
    assert 'is not installed; install it with: pip install "bnfuse[keras]"' in lines[0]
    assert "Traceback" not in r.stderr


BUG = (
    "import bnfuse.onnx.backend as b\n"
    "def broken(self, *args, **kwargs):\n"
    "    raise RuntimeError('simulated bug in the pass')\n"
    "b.OnnxBackend.fuse = broken"
)


def test_internal_error_exits_5_in_one_line(tmp_path: Path) -> None:
    src = backward_and_forward_model(tmp_path / "m.onnx")
    r = _cli(BUG, str(src), "-o", str(tmp_path / "f.onnx"))
    assert r.returncode == 5, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "bnfuse: error: internal error (RuntimeError: simulated bug in the pass); this is a bnfuse "
        "bug, rerun with BNFUSE_DEBUG=1 for a traceback"
    ], r.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_bnfuse_debug_shows_the_traceback(tmp_path: Path) -> None:
    src = backward_and_forward_model(tmp_path / "m.onnx")
    r = _cli(BUG, str(src), debug=True)
    assert r.returncode not in (0, 5), r.stderr
    assert "Traceback (most recent call last)" in r.stderr
    assert "in broken" in r.stderr  # the frame that raised
    assert r.stderr.strip().splitlines()[-1] == "RuntimeError: simulated bug in the pass"
    assert "internal error" not in r.stderr  # the one-line summary is replaced
