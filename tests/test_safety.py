"""Nothing lost: the input is never modified, outputs appear atomically, an interrupted
write leaves nothing behind, a failed validation writes nothing unless forced."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from onnx_util import GraphBuilder

import bnfuse
from bnfuse.errors import ValidationError


def make(path: Path) -> Path:
    b = GraphBuilder(seed=21)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn_a")
    y = b.bn(b.conv(b.node("Relu", [y]), 4, 4, [3, 3]), 4, name="bn_b")
    b.output(y)
    onnx.save(b.model(), path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_write_leaves_no_file(tmp_path: Path, sig: signal.Signals) -> None:
    src = make(tmp_path / "m.onnx")
    before = digest(src)
    out = tmp_path / "f.onnx"
    script = textwrap.dedent(
        f"""
        import sys, time
        from bnfuse.backend import atomic_path
        from bnfuse.onnx.backend import OnnxBackend

        def slow_save(self, model, path):
            with atomic_path(path) as tmp:
                tmp.write_bytes(model.proto.SerializeToString()[:100])  # a partial file
                print("WRITING", flush=True)
                time.sleep(60)

        OnnxBackend.save = slow_save
        from bnfuse.cli import main
        sys.argv = ["bnfuse", {str(src)!r}, "-o", {str(out)!r}, "-q"]
        main()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", proc.stderr.read() if proc.stderr else line
    assert list(tmp_path.glob(".f.onnx.*")), "the temporary file should exist mid-write"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted; nothing written" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert digest(src) == before


def corrupt_fold(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """Make exactly the fold of BN ``victim`` wrong (a deliberately broken weight)."""
    import bnfuse.onnx.rules as rules

    real = rules.ConvBN.rewrite

    def rewrite(self, m, g):  # type: ignore[no-untyped-def]
        if m.norm.name == victim:
            m.norm.affine = type(m.norm.affine)(m.norm.affine.scale * 1.5, m.norm.affine.shift)
        return real(self, m, g)

    monkeypatch.setattr(rules.ConvBN, "rewrite", rewrite)


def test_failed_validation_writes_nothing_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make(tmp_path / "m.onnx")
    before = digest(src)
    out = tmp_path / "f.onnx"
    corrupt_fold(monkeypatch, "bn_b")
    with pytest.raises(ValidationError) as info:
        bnfuse.fuse(src, out)
    assert not out.exists()
    assert info.value.result is not None
    assert info.value.result.validation is not None
    assert info.value.result.validation.culprits == ("bn_b",)
    res = bnfuse.fuse(src, out, force=True)
    assert res.written and out.exists() and not res.ok
    out.unlink()
    res = bnfuse.fuse(src, out, rollback=True)
    assert res.ok and res.written
    assert [f.bn for f in res.folds] == ["bn_a"]
    assert res.validation is not None and res.validation.rolled_back == ("bn_b",)
    assert any(r.bn == "bn_b" and "rolled back" in r.reason for r in res.refusals)
    fused = onnx.load(out)
    assert sum(n.op_type == "BatchNormalization" for n in fused.graph.node) == 1
    assert digest(src) == before


def test_cli_validation_failure_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from bnfuse.cli import app

    src = make(tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    corrupt_fold(monkeypatch, "bn_a")
    r = CliRunner().invoke(app, [str(src), "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "validation failed" in r.output and "bn_a" in r.output
    assert not out.exists()


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI runs as root, which can read anything: simulate the permission check's answer.
    import os

    from bnfuse.errors import ModelLoadError

    src = make(tmp_path / "m.onnx")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match="permission denied"):
        bnfuse.fuse(src)


def test_input_model_object_and_file_untouched_by_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make(tmp_path / "m.onnx")
    m = onnx.load(src)
    snapshot = m.SerializeToString()
    corrupt_fold(monkeypatch, "bn_a")
    bnfuse.fuse(m, rollback=True)
    assert m.SerializeToString() == snapshot
