"""Several models in one run: ``bnfuse MODEL... -o DIR`` and ``bnfuse.fuse_many``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx_util import GraphBuilder, count_ops

import bnfuse
import bnfuse.cli
import bnfuse.cli_common
import bnfuse.cli_many
import bnfuse.many
from bnfuse.cli import run
from bnfuse.many import ModelRun, expand_models, fuse_many, worst_exit_code


def make_model(path: Path, seed: int = 0, refused: bool = False) -> Path:
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn1")
    if refused:  # a BN before a padded conv: left in place
        y = b.conv(b.bn(b.node("Relu", [y]), 4, name="bn_left"), 4, 4, [3, 3], pads=[1] * 4)
    b.output(y)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(b.model(), path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """a.onnx, and a directory with b.onnx, c.onnx, a broken d.onnx and a note."""
    make_model(tmp_path / "a.onnx", 1, refused=True)
    make_model(tmp_path / "dir" / "b.onnx", 2)
    make_model(tmp_path / "dir" / "c.onnx", 3)
    (tmp_path / "dir" / "d.onnx").write_bytes(b"\x08\xff\xff\xff garbage" * 10)
    (tmp_path / "dir" / "notes.txt").write_text("not a model")
    return tmp_path


def test_expand_models(models: Path) -> None:
    (models / "dir" / "saved").mkdir()
    (models / "dir" / "saved" / "saved_model.pb").write_bytes(b"")
    (models / "dir" / "x.onnx.d").mkdir()  # a directory that is not a SavedModel: skipped
    (models / "dir" / "k.keras").write_bytes(b"")
    (models / "dir" / "h.H5").write_bytes(b"")
    got = expand_models([models / "a.onnx", models / "dir", models / "a.onnx"])
    names = [p.relative_to(models).as_posix() for p in got]
    assert names == [
        "a.onnx", "dir/b.onnx", "dir/c.onnx", "dir/d.onnx", "dir/h.H5", "dir/k.keras", "dir/saved",
    ]  # fmt: skip
    with pytest.raises(bnfuse.OptionError, match=r"no \.onnx, \.keras or \.h5"):
        expand_models([models / "dir" / "x.onnx.d"])


def test_cli_many_writes_each_output_under_its_name_and_reports_the_worst_code(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = sha(models / "a.onnx")
    out = models / "new" / "out"  # created, parents included
    code = run([str(models / "a.onnx"), str(models / "dir"), "-o", str(out)])
    cap = capsys.readouterr()
    assert code == 3  # d.onnx cannot be read; the others are written anyway
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx", "c.onnx"]
    assert count_ops(onnx.load(out / "a.onnx"), "BatchNormalization") == 1
    assert count_ops(onnx.load(out / "b.onnx"), "BatchNormalization") == 0
    assert sha(models / "a.onnx") == digest
    errors = cap.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"bnfuse: error: {models / 'dir' / 'd.onnx'}")
    text = " ".join(cap.out.split())
    assert "4 model(s): 3 ok, 1 failed" in text
    for header in ("model", "folded", "left", "validation", "time s", "output"):
        assert header in text
    lines = cap.out.splitlines()
    (row_a,) = [ln for ln in lines if str(models / "a.onnx") in ln]
    assert row_a.split()[1:4] == ["1", "1", "passed"]  # one folded, one left, validated
    assert str(out / "a.onnx") in row_a


def test_fail_fast_stops_at_the_first_failure(models: Path) -> None:
    out = models / "out"
    bad = models / "0bad.onnx"  # sorts first
    bad.write_bytes(b"")
    code = run([str(bad), str(models / "a.onnx"), "-o", str(out), "--fail-fast", "--json"])
    assert code == 3
    assert not (out / "a.onnx").exists()
    code = run([str(bad), str(models / "a.onnx"), "-o", str(out)])
    assert code == 3 and (out / "a.onnx").exists()  # without --fail-fast the rest go on


def test_json_lines_one_object_per_model(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run([str(models / "dir"), "-o", str(models / "out"), "--json", "--no-validate"])
    out = capsys.readouterr().out
    assert code == 3
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == 3
    by_source = {Path(o["source"]).name: o for o in objs}
    assert by_source["b.onnx"]["schema"] == "bnfuse.result/1"
    assert by_source["b.onnx"]["folds"][0]["bn"] == "bn1" and by_source["b.onnx"]["written"]
    assert by_source["d.onnx"]["schema"] == "bnfuse.error/1"
    assert by_source["d.onnx"]["exit_code"] == 3


def test_report_directory_one_report_per_model_and_a_summary(models: Path) -> None:
    rep = models / "reports"
    code = run([str(models / "a.onnx"), str(models / "dir" / "b.onnx"), "--report", str(rep)])
    assert code == 0
    names = sorted(p.name for p in rep.iterdir())
    assert names == [
        "a.onnx.html", "a.onnx.json", "a.onnx.md", "b.onnx.html", "b.onnx.json", "b.onnx.md",
        "summary.html", "summary.json", "summary.md",
    ]  # fmt: skip
    page = (rep / "summary.html").read_text(encoding="utf-8")
    assert 'href="a.onnx.html"' in page and 'href="b.onnx.html"' in page
    assert "bn_left" in (rep / "a.onnx.html").read_text(encoding="utf-8")
    a = json.loads((rep / "a.onnx.json").read_text(encoding="utf-8"))
    assert a["schema"] == "bnfuse.result/1" and a["refusals"][0]["bn"] == "bn_left"
    summary = json.loads((rep / "summary.json").read_text(encoding="utf-8"))
    assert summary["schema"] == "bnfuse.summary/1" and summary["exit_code"] == 0
    assert [m["folded"] for m in summary["models"]] == [1, 1]
    assert [m["left"] for m in summary["models"]] == [1, 0]
    assert "| a.onnx" in (rep / "summary.md").read_text(encoding="utf-8").replace(
        str(models) + "/", ""
    )
    assert not list(models.glob("*.bnfuse-tmp*"))


def test_report_directory_without_the_html_extra_writes_markdown_and_json(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfuse.options

    monkeypatch.setattr(bnfuse.options, "html_available", lambda: False)
    monkeypatch.setattr(bnfuse.many, "html_available", lambda: False)
    monkeypatch.setattr(bnfuse.cli_many, "html_available", lambda: False)
    rep = models / "reports"
    assert run([str(models / "a.onnx"), str(models / "dir" / "b.onnx"), "--report", str(rep)]) == 0
    assert sorted(p.name for p in rep.iterdir()) == [
        "a.onnx.json", "a.onnx.md", "b.onnx.json", "b.onnx.md", "summary.json", "summary.md",
    ]  # fmt: skip


def test_report_file_with_several_models_is_a_usage_error(models: Path) -> None:
    code = run([str(models / "a.onnx"), str(models / "dir"), "--report", str(models / "r.md")])
    assert code == 2


def test_output_file_name_with_several_models_is_a_usage_error(models: Path) -> None:
    code = run([str(models / "a.onnx"), str(models / "dir"), "-o", str(models / "out.onnx")])
    assert code == 2
    assert not (models / "out.onnx").exists()


def test_same_output_name_twice_is_a_usage_error(tmp_path: Path) -> None:
    make_model(tmp_path / "x" / "m.onnx")
    make_model(tmp_path / "y" / "m.onnx")
    code = run([str(tmp_path / "x" / "m.onnx"), str(tmp_path / "y" / "m.onnx"), "-o", "o"])
    assert code == 2
    assert not (tmp_path / "o").exists()


def test_jobs_run_in_separate_processes_and_give_the_serial_results(models: Path) -> None:
    paths = [models / "a.onnx", models / "dir"]
    serial = fuse_many(paths, models / "s", validate=False)
    parallel = fuse_many(paths, models / "p", validate=False, jobs=2)
    assert [r.status for r in parallel] == ["ok", "ok", "ok", "failed"]
    assert [r.exit_code for r in parallel] == [r.exit_code for r in serial]
    for name in ("a.onnx", "b.onnx", "c.onnx"):
        assert sha(models / "s" / name) == sha(models / "p" / name)
    assert all(r.result is None or r.result.model is None for r in parallel)


def test_fuse_many_api_progress_and_on_result(models: Path) -> None:
    steps: list[tuple[str, float, float | None]] = []
    seen: list[ModelRun] = []
    runs = fuse_many(
        [models / "a.onnx", models / "dir" / "b.onnx"],
        models / "out",
        options=bnfuse.Options(validate=False),
        progress=lambda d, done, total: steps.append((d, done, total)),
        on_result=seen.append,
    )
    assert [Path(r.source).name for r in runs] == ["a.onnx", "b.onnx"]
    assert seen == runs
    assert worst_exit_code(runs) == 0
    assert all(total == 2 for _, _, total in steps)  # one bar across the models
    assert ("a.onnx: folding", 0, 2) in steps and ("b.onnx: writing", 1, 2) in steps
    assert steps[-1] == ("2/2 models", 2, 2)


def test_validation_failure_in_one_model_exits_1(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnx_util import corrupt_backward_folds

    corrupt_backward_folds(monkeypatch, lambda w: w.ndim == 4 and w.shape[:2] == (4, 3))
    runs = fuse_many([models / "a.onnx", models / "dir" / "b.onnx"], models / "out")
    assert [r.exit_code for r in runs] == [1, 1]
    assert all(r.result is not None and not r.result.ok for r in runs)
    assert not (models / "out" / "a.onnx").exists()


def test_progress_bar_shown_once_across_models(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars: list[Any] = []
    real = bnfuse.cli_common.progress_bar

    def spy(err: Any, total: float | None = None) -> Any:
        bars.append(err)
        return real(err, total)

    monkeypatch.setattr(bnfuse.cli_common, "is_terminal", lambda stream: True)
    monkeypatch.setattr(bnfuse.cli_common, "progress_bar", spy)
    assert run([str(models / "a.onnx"), str(models / "dir" / "b.onnx"), "--no-validate"]) == 0
    assert len(bars) == 1


@pytest.mark.keras
def test_a_directory_of_keras_and_onnx_models(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    samples = Path(__file__).resolve().parents[1] / "sample_models"
    out = tmp_path / "out"
    runs = fuse_many([samples], out, validate=False)
    names = sorted(Path(r.source).name for r in runs)
    assert names == sorted(
        p.name for p in samples.iterdir() if p.suffix in (".onnx", ".keras", ".h5")
    )
    assert {Path(r.source).suffix for r in runs} == {".onnx", ".keras", ".h5"}
    assert all(r.status == "ok" and r.result is not None and r.result.folds for r in runs), [
        (r.source, r.error) for r in runs
    ]
    assert sorted(p.name for p in out.iterdir()) == names


def test_one_model_report_directory(models: Path) -> None:
    rep = models / "r"
    assert run([str(models / "a.onnx"), "--no-validate", "--report", str(rep)]) == 0
    assert sorted(p.name for p in rep.iterdir()) == ["a.onnx.html", "a.onnx.json", "a.onnx.md"]
    data = json.loads((rep / "a.onnx.json").read_text(encoding="utf-8"))
    assert data["schema"] == "bnfuse.result/1" and data["folds"][0]["bn"] == "bn1"
