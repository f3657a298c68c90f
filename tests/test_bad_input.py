"""Bad input corpus (generated here, never downloaded): each case gets one clear line, a
documented exit code, and no output file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_util import GraphBuilder
from typer.testing import CliRunner

import bnfuse
from bnfuse.cli import app

runner = CliRunner()


def good_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=31)
    x = b.input("x", ["N", 3, 8, 8])
    b.output(b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn"))
    return b.model()


def write_case(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """Create the bad input; return the model path and extra CLI args."""
    p = tmp_path / "model.onnx"
    extra: list[str] = []
    if case == "empty":
        p.write_bytes(b"")
    elif case == "random_bytes":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        data = good_model().SerializeToString()
        p.write_bytes(data[: len(data) // 2])
    elif case == "json_named_onnx":
        p.write_text(json.dumps({"not": "a model"}))
    elif case == "text_named_onnx":
        p.write_text("hello, I am a text file\n")
    elif case == "directory":
        p.mkdir()
    elif case == "missing":
        pass
    elif case == "keras_not_zip":
        p = tmp_path / "model.keras"
        p.write_text("not a zip")
    elif case == "keras_zip_without_model":
        p = tmp_path / "model.keras"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "nothing here")
    elif case == "opset_too_new":
        m = good_model()
        del m.opset_import[:]
        m.opset_import.append(helper.make_opsetid("", 99))
        onnx.save(m, p)
    elif case == "malformed_input_shape":
        onnx.save(good_model(), p)
        extra = ["--input-shape", "x=1xthree"]
    elif case == "npz_object_array":
        onnx.save(good_model(), p)
        npz = tmp_path / "data.npz"
        np.savez(npz, x=np.array([{"a": 1}], dtype=object))
        extra = ["--inputs", str(npz)]
    elif case == "npz_wrong_key":
        onnx.save(good_model(), p)
        npz = tmp_path / "data.npz"
        np.savez(npz, y=np.zeros((1, 3, 8, 8), np.float32))
        extra = ["--inputs", str(npz)]
    elif case == "bad_report_suffix":
        onnx.save(good_model(), p)
        extra = ["--report", str(tmp_path / "r.txt")]
    elif case == "fails_at_run":
        # onnxruntime creates the session but a Conv fails when run (group=0; found by
        # the mutation fuzz): the original cannot be evaluated. That Conv comes after
        # the fold (bnfuse refuses to fold into a Conv with group=0 itself)
        b = GraphBuilder(seed=31)
        x = b.input("x", ["N", 3, 8, 8])
        y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn")
        b.output(b.conv(b.node("Relu", [y]), 4, 4, [1, 1]))
        m = b.model()
        conv = [n for n in m.graph.node if n.op_type == "Conv"][-1]
        attrs = [a for a in conv.attribute if a.name != "group"]
        del conv.attribute[:]
        conv.attribute.extend([*attrs, helper.make_attribute("group", 0)])
        onnx.save(m, p)
    elif case == "no_graph":
        p.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    else:  # pragma: no cover - a typo in the parametrization
        raise AssertionError(case)
    return p, extra


CASES = [
    ("empty", 3, "empty file"),
    ("random_bytes", 3, "model.onnx: not a readable ONNX model ("),
    ("truncated", 3, "not a readable ONNX model"),
    ("json_named_onnx", 3, "model.onnx: not a readable ONNX model ("),
    ("text_named_onnx", 3, "model.onnx: not a readable ONNX model ("),
    ("directory", 3, "is a directory"),
    ("missing", 3, "no such file"),
    ("opset_too_new", 3, "onnxruntime cannot load the model"),
    ("malformed_input_shape", 2, "--input-shape"),
    ("npz_object_array", 2, "object arrays"),
    ("npz_wrong_key", 2, "data.npz: no array for input(s) 'x'; expected keys: 'x' (found: 'y')"),
    ("bad_report_suffix", 2, "--report"),
    ("no_graph", 3, "not an ONNX model"),
    ("fails_at_run", 3, "the model fails to run"),
]


@pytest.mark.parametrize(("case", "code", "message"), CASES)
def test_bad_input(tmp_path: Path, case: str, code: int, message: str) -> None:
    src, extra = write_case(tmp_path, case)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = runner.invoke(app, [str(src), "-o", str(out), *extra])
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith("bnfuse: error: ")
    assert message in lines[0]
    assert "Traceback" not in r.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.keras
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("keras_not_zip", "model.keras: not a .keras file (not a zip archive)"),
        ("keras_zip_without_model", "model.keras: zip archive without a Keras model"),
    ],
)
def test_bad_keras_files(tmp_path: Path, case: str, message: str) -> None:
    pytest.importorskip("tensorflow")
    src, extra = write_case(tmp_path, case)
    out = tmp_path / "fused.keras"
    r = runner.invoke(app, [str(src), "-o", str(out), *extra])
    assert r.exit_code == 3, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith("bnfuse: error: ") and message in lines[0]
    assert "Traceback" not in r.output
    assert not out.exists()


def test_bad_statistics_are_refused_not_crashed(tmp_path: Path) -> None:
    b = GraphBuilder(seed=32)
    x = b.input("x", ["N", 3, 8, 8])
    c = b.conv(x, 3, 4, [3, 3])
    stats = [np.ones(4), np.zeros(4), np.zeros(4), np.array([1.0, -1.0, 1, 1])]
    y = b.node(
        "BatchNormalization", [c, *[b.const(s.astype(np.float32)) for s in stats]], name="bn"
    )
    b.output(y)
    src = tmp_path / "m.onnx"
    onnx.save(b.model(), src)
    r = runner.invoke(app, [str(src), "--json", "--no-validate"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["refusals"][0]["reason"] == "variance + epsilon <= 0: BN is undefined"


def test_large_weight_of_the_wrong_size_is_rejected_or_refused(tmp_path: Path) -> None:
    # a file's large payloads are measured at load for free (they are located, not
    # copied): a damaged one makes the file unreadable (exit 3). In an in-memory
    # ModelProto, payloads of 1 MiB or more are not measured (that would copy them); a
    # damaged one is caught when the fold reads it, and the BN stays with the reason.
    b = GraphBuilder(seed=33)
    x = b.input("x", ["N", 64, 8, 8])
    b.output(b.bn(b.conv(x, 64, 512, [3, 3]), 512, name="bn"))  # weight: 1.18 MB
    m = b.model()
    w = next(t for t in m.graph.initializer if len(t.dims) == 4)
    assert len(w.raw_data) >= 1 << 20
    w.raw_data = w.raw_data[:-4]  # one float short
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    r = runner.invoke(app, [str(src), "-o", str(tmp_path / "f.onnx")])
    assert r.exit_code == 3, r.output
    assert r.output.strip().endswith(
        f"{src}: damaged ONNX model (tensor 'W1' holds 1179644 bytes but its shape "
        "[512, 64, 3, 3] needs 1179648)"
    )
    assert "Traceback" not in r.output and not (tmp_path / "f.onnx").exists()

    res = bnfuse.fuse(m, validate=False)
    (refusal,) = res.refusals
    assert refusal.bn == "bn" and "cannot be read" in refusal.reason
    assert res.model.graph.initializer[0] == m.graph.initializer[0]
