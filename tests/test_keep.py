"""``--keep PATTERN`` / ``keep=``: matching BNs stay unfolded, refused with code
``excluded``; the rest fold as before."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx_util import GraphBuilder, count_ops

import bnfuse
from bnfuse.cli import run

ROOT = Path(__file__).resolve().parents[1]


def make_model(path: Path) -> Path:
    b = GraphBuilder(seed=11)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="stem/bn")
    y = b.bn(b.conv(b.node("Relu", [y]), 4, 4, [3, 3]), 4, name="block1/Norm_A")
    y = b.bn(b.conv(b.node("Relu", [y]), 4, 4, [1, 1]), 4, name="block1/norm_b")
    y = b.bn(b.conv(b.node("Relu", [y]), 4, 4, [1, 1]), 4, name="block2/norm_a")
    b.output(y)
    onnx.save(b.model(), path)
    return path


def test_keep_leaves_matching_bns_and_folds_the_rest(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    res = bnfuse.fuse(src, tmp_path / "f.onnx", keep=["block1/*", "*/norm_a"])
    assert [f.bn for f in res.folds] == ["stem/bn"]
    kept = {r.bn: r for r in res.refusals}
    assert set(kept) == {"block1/Norm_A", "block1/norm_b", "block2/norm_a"}
    assert all(r.code == "excluded" for r in kept.values())
    assert kept["block1/norm_b"].reason == "kept unfolded: matches --keep 'block1/*'"
    assert kept["block2/norm_a"].reason == "kept unfolded: matches --keep '*/norm_a'"
    assert res.ok and res.validation is not None  # the rest validated
    assert count_ops(onnx.load(tmp_path / "f.onnx"), "BatchNormalization") == 3


def test_keep_is_case_sensitive_and_matches_whole_names(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    res = bnfuse.fuse(src, validate=False, keep=["*norm_a", "block"])
    assert [r.bn for r in res.refusals] == ["block2/norm_a"]
    assert len(res.folds) == 3


def test_cli_keep_repeatable_and_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_model(tmp_path / "m.onnx")
    code = run([str(src), "--json", "--keep", "stem/*", "--keep", "block2/*"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["bn"]: r["code"] for r in data["refusals"]} == {
        "stem/bn": "excluded",
        "block2/norm_a": "excluded",
    }
    assert [f["bn"] for f in data["folds"]] == ["block1/Norm_A", "block1/norm_b"]
    code = run([str(src), "--no-validate", "--keep", "block2/*"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1 left: [excluded] kept unfolded: matches --keep 'block2/*': block2/norm_a" in out


@pytest.mark.keras
def test_keep_on_a_keras_model(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    src = ROOT / "sample_models" / "digits_cnn.keras"
    res = bnfuse.fuse(src, tmp_path / "f.keras", keep=["bn_2", "bn_4"], samples=2)
    assert sorted(f.bn for f in res.folds) == ["bn_1", "bn_3"]
    assert {(r.bn, r.code) for r in res.refusals} == {("bn_2", "excluded"), ("bn_4", "excluded")}
    assert res.ok and res.written
