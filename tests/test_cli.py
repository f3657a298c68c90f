"""CLI behaviour: exit codes, --dry-run, --json, --skip, errors without tracebacks."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx_util import GraphBuilder, corrupt_backward_folds, count_ops
from rich.console import Console
from typer.testing import CliRunner

import bnfuse.api
import bnfuse.cli
import bnfuse.fold
from bnfuse.bench import ORT_FOLDS_NOTE
from bnfuse.cli import app

runner = CliRunner()


def make_model(path: Path, seed: int = 0) -> Path:
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.conv(x, 3, 4, [3, 3])
    y = b.bn(y, 4, name="bn1")
    y = b.node("Relu", [y])
    y = b.bn(y, 4, name="bn_refused")  # followed by a padded conv: refused
    y = b.conv(y, 4, 4, [3, 3], pads=[1, 1, 1, 1])
    b.output(y)
    onnx.save(b.model(), path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flat(text: str) -> str:
    """The text with every run of whitespace (line wraps included) as one space."""
    return " ".join(text.split())


def test_fuse_writes_and_reports(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    digest = sha(src)
    out = tmp_path / "f.onnx"
    r = runner.invoke(app, [str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 folded backward by conv-bn" in flat(r.output)  # folds summed up by default
    assert "bn_refused" in r.output and "zero padding after BN" in r.output
    assert "Validation passed" in r.output
    fused = onnx.load(out)
    assert count_ops(fused, "BatchNormalization") == 1
    assert sha(src) == digest
    assert not list(tmp_path.glob("*.bnfuse-tmp*"))


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    r = runner.invoke(app, [str(src), "-o", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert not out.exists()
    assert "dry run: nothing written" in " ".join(r.output.split())


def test_json_output_parses(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    r = runner.invoke(app, [str(src), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["schema"] == "bnfuse.result/1"
    assert [f["bn"] for f in data["folds"]] == ["bn1"]
    assert data["refusals"][0]["bn"] == "bn_refused"
    assert data["validation"]["passed"] is True


def test_skip_rule_and_unknown_rule(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    r = runner.invoke(app, [str(src), "--json", "--skip", "conv-bn"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["folds"] == []
    r = runner.invoke(app, [str(src), "--skip", "no-such-rule"])
    assert r.exit_code == 2
    assert "unknown rule(s) no-such-rule" in r.output


def test_bench_and_validation_options_reach_the_report(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    out, rj, rm = tmp_path / "f.onnx", tmp_path / "r.json", tmp_path / "r.md"
    args = [str(src), "-o", str(out), "--bench", "--batch", "1,2", "--bench-seconds", "0.2"]
    args += ["--threads", "2", "--samples", "3", "--rtol", "1e-3"]
    r = runner.invoke(app, [*args, "--report", str(rj), "--report", str(rm)])
    assert r.exit_code == 0, r.output
    assert out.exists() and rj.exists() and rm.exists()
    data = json.loads(rj.read_text(encoding="utf-8"))
    rows = data["bench"]["rows"]
    assert len(rows) == 4  # 2 runtimes x 2 batches
    assert {(row["runtime"], row["batch"]) for row in rows} == {
        (f"onnxruntime {level}", b)
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
        for b in (1, 2)
    }
    assert data["bench"]["threads"] == 2 and data["bench"]["seconds"] == 0.2
    assert data["validation"]["samples"] == 3
    assert data["validation"]["outputs"] and all(
        o["rtol"] == 1e-3 for o in data["validation"]["outputs"]
    )
    assert ORT_FOLDS_NOTE in flat(r.output)
    assert f"- note: {ORT_FOLDS_NOTE}" in rm.read_text(encoding="utf-8")


def test_rollback_writes_the_rest_and_names_the_bn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # corrupt the fold of bn1 (into the 3->4 Conv) by 5%: validation fails, bisection
    # blames bn1, --rollback leaves it in place and writes the model anyway
    hits = corrupt_backward_folds(monkeypatch, lambda w: w.ndim == 4 and w.shape[:2] == (4, 3))
    src = make_model(tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    r = runner.invoke(app, [str(src), "-o", str(out)])
    assert hits and r.exit_code == 1, r.output  # without --rollback: nothing written
    assert not out.exists()
    r = runner.invoke(app, [str(src), "-o", str(out), "--rollback", "-v"])
    assert r.exit_code == 0, r.output
    assert out.exists() and count_ops(onnx.load(out), "BatchNormalization") == 2
    text = flat(r.output)
    assert "rolled back: bn1" in text
    assert "warning: rolled back 1 fold(s): bn1" in text
    assert "bn1 BatchNormalization rolled back its fold failed validation" in text


def test_progress_bar_shows_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")  # rich draws nothing on a "dumb" terminal
    buf = io.StringIO()
    console = Console(force_terminal=True, file=buf, width=120)
    cb, stop = bnfuse.cli._progress(console)
    try:
        cb("validating", 0, None)
        cb("timing onnxruntime ORT_ENABLE_ALL, batch 2", 1, 4)
    finally:
        stop()
    assert "timing onnxruntime ORT_ENABLE_ALL, batch 2" in buf.getvalue()


@pytest.mark.parametrize(("flags", "shown"), [([], True), (["-q"], False), (["--json"], False)])
def test_fuse_gets_a_progress_callback_unless_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], shown: bool
) -> None:
    monkeypatch.setattr(bnfuse.cli, "_is_terminal", lambda stream: True)  # stderr a terminal
    seen: list[Any] = []
    steps: list[str] = []
    real_fuse = bnfuse.api.fuse

    def fuse(*args: Any, **kwargs: Any) -> Any:
        progress = kwargs.get("progress")
        seen.append(progress)
        if progress is not None:

            def recording(what: str, done: float, total: float | None) -> None:
                steps.append(what)
                progress(what, done, total)

            kwargs["progress"] = recording
        return real_fuse(*args, **kwargs)

    monkeypatch.setattr(bnfuse.api, "fuse", fuse)
    r = runner.invoke(app, [str(make_model(tmp_path / "m.onnx")), *flags])
    assert r.exit_code == 0, r.output
    assert len(seen) == 1
    if shown:
        assert callable(seen[0])
        assert "validating" in steps
    else:
        assert seen[0] is None


def test_list_rules(tmp_path: Path) -> None:
    r = runner.invoke(app, [str(make_model(tmp_path / "m.onnx")), "--list-rules"])
    assert r.exit_code == 0
    assert "conv-bn" in r.output.split() and "bn-gemm" in r.output.split()


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("missing", 3, "no such file"),
        ("empty", 3, "empty file"),
        ("garbage", 3, "not a readable ONNX model"),
        ("suffix", 3, "unknown model format"),
        ("same_output", 2, "would overwrite the input"),
        ("missing_dir", 2, "does not exist"),
        ("bad_batch", 2, "--batch"),
    ],
)
def test_bad_input_exit_codes(tmp_path: Path, setup: str, code: int, message: str) -> None:
    src = tmp_path / "m.onnx"
    args: list[str]
    if setup == "missing":
        args = [str(src)]
    elif setup == "empty":
        src.write_bytes(b"")
        args = [str(src)]
    elif setup == "garbage":
        src.write_bytes(b"\x08\xff\xff\xff garbage" * 10)
        args = [str(src)]
    elif setup == "suffix":
        args = [str(tmp_path / "m.txt")]
    else:
        make_model(src)
        args = {
            "same_output": [str(src), "-o", str(src)],
            "missing_dir": [str(src), "-o", str(tmp_path / "nope" / "f.onnx")],
            "bad_batch": [str(src), "--batch", "1,x"],
        }[setup]
    r = runner.invoke(app, args)
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_python_m_bnfuse_and_help(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bnfuse", "--help"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0
    assert "--dry-run" in r.stdout and "Exit codes" in r.stdout
    src = make_model(tmp_path / "m.onnx")
    r = subprocess.run(
        [sys.executable, "-m", "bnfuse", str(src), "--json", "--no-validate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["folds"][0]["bn"] == "bn1"


def test_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("bnfuse ")
