"""Options travel as one typed object; every value is checked once, in the API, with a
message naming the parameter; the CLI says the flag instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx_util import GraphBuilder

import bnfuse
import bnfuse.api
from bnfuse.cli import FLAGS, run
from bnfuse.options import OptionError, Options


def make_model(path: Path) -> Path:
    b = GraphBuilder(seed=7)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn1")
    y = b.bn(b.conv(b.node("Relu", [y]), 4, 4, [3, 3]), 4, name="bn2")
    b.output(y)
    onnx.save(b.model(), path)
    return path


BAD = [
    ("samples", 0, "must be at least 1"),
    ("batches", (1, 0), "batch sizes must be positive integers"),
    ("batches", (), "at least one batch size"),
    ("threads", 0, "must be an integer >= 1"),
    ("bench_seconds", 0.0, "must be > 0 seconds"),
    ("rtol", -1.0, "finite number >= 0"),
    ("atol", float("nan"), "finite number >= 0"),
    ("keep", ("",), "non-empty strings"),
    ("reports", (Path("r.txt"),), "use a .md, .json or .html file name"),
    ("input_shapes", {"x": (1, 0)}, "dims must be positive integers"),
]


@pytest.mark.parametrize(("param", "value", "detail"), BAD)
def test_api_names_the_parameter(tmp_path: Path, param: str, value: Any, detail: str) -> None:
    src = make_model(tmp_path / "m.onnx")
    with pytest.raises(OptionError) as info:
        bnfuse.fuse(src, tmp_path / "f.onnx", **{param: value})
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ") and detail in str(info.value)
    assert not (tmp_path / "f.onnx").exists()
    # the same check through the options object
    with pytest.raises(OptionError, match=f"^{param}: "):
        bnfuse.fuse(src, options=Options(**{param: value}))


CLI_BAD = [
    (["--samples", "0"], "--samples: must be at least 1"),
    (["--batch", "1,0"], "--batch: batch sizes must be positive integers"),
    (["--threads", "0"], "--threads: must be an integer >= 1"),
    (["--bench-seconds", "0"], "--bench-seconds: must be > 0 seconds"),
    (["--rtol", "-1"], "--rtol: must be a finite number >= 0"),
    (["--keep", ""], "--keep: patterns must be non-empty strings"),
    (["--report", "r.txt"], "--report: r.txt: use a .md, .json or .html file name"),
    (["--skip", "no-such-rule"], "--skip: unknown rule(s) no-such-rule"),
]


@pytest.mark.parametrize(("args", "line"), CLI_BAD)
def test_cli_says_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    src = make_model(tmp_path / "m.onnx")
    code = run([str(src), "-o", str(tmp_path / "f.onnx"), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bnfuse: error: {line}"), err
    assert not (tmp_path / "f.onnx").exists()


def test_every_option_field_has_a_flag() -> None:
    named = {f.name for f in dataclasses.fields(Options)} - {
        "validate", "rollback", "force", "dry_run", "forward", "bench", "unsafe_load",
        "treat_initializer_inputs_as_constants",
    }  # fmt: skip
    assert named <= set(FLAGS)


def test_cli_passes_one_options_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = bnfuse.api.fuse

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bnfuse.api, "fuse", spy)
    src = make_model(tmp_path / "m.onnx")
    args = [str(src), "--json", "--samples", "3", "--seed", "4", "--batch", "1,2"]
    args += ["--skip", "conv-bn", "--keep", "bn*", "--no-forward", "--rtol", "0.01", "-q"]
    assert run(args) == 0
    (kw,) = seen
    assert set(kw) == {"options", "progress"}
    o = kw["options"]
    assert isinstance(o, Options)
    assert (o.samples, o.seed, o.batches, o.skip, o.keep) == (3, 4, (1, 2), ("conv-bn",), ("bn*",))
    assert o.forward is False and o.rtol == 0.01 and o.validate is True


def test_options_and_keywords_give_the_same_result(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    a = bnfuse.fuse(src, samples=2, seed=3, keep=["bn2"])
    b = bnfuse.fuse(src, options=Options(samples=2, seed=3, keep=("bn2",)))
    assert a.to_dict() == b.to_dict()
    assert a.validation is not None and a.validation.samples == 2
    assert [f.bn for f in a.folds] == ["bn1"] and a.refusals[0].code == "excluded"


def test_options_and_keywords_together_are_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    with pytest.raises(bnfuse.UsageError, match="either as options= or as keywords"):
        bnfuse.fuse(src, samples=2, options=Options())


def test_reports_are_written_by_the_api_even_when_validation_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnx_util import corrupt_backward_folds

    corrupt_backward_folds(monkeypatch, lambda w: w.ndim == 4 and w.shape[:2] == (4, 3))
    src = make_model(tmp_path / "m.onnx")
    rj, rm = tmp_path / "r.json", tmp_path / "r.md"
    with pytest.raises(bnfuse.ValidationError):
        bnfuse.fuse(src, tmp_path / "f.onnx", reports=[rj, rm])
    assert '"passed": false' in rj.read_text(encoding="utf-8")
    assert "Validation FAILED" in rm.read_text(encoding="utf-8")
    assert not (tmp_path / "f.onnx").exists()
