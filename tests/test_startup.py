"""Start-up: what a run imports. A user waits for the whole process; a fold takes tens of
milliseconds, so a run must not load what it does not use (timings live in
benchmarks/startup.py, never in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
from onnx_util import GraphBuilder

HEAVY = ("onnxruntime", "tensorflow", "keras", "typer", "pydantic", "click", "h5py", "tf2onnx")


def make_model(path: Path) -> Path:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 8, 8])
    b.output(b.bn(b.conv(x, 3, 4, [3, 3]), 4, name="bn1"))
    onnx.save(b.model(), path)
    return path


def run_and_list_modules(args: list[str]) -> tuple[int, list[str], str]:
    """Run the CLI on ``args`` in a fresh interpreter; its exit code, the modules it
    imported, and what it printed on stderr."""
    script = textwrap.dedent(
        f"""
        import io, json, sys
        from bnfuse.cli import run
        code = run({args!r}, out=io.StringIO())
        print(json.dumps([code, sorted(sys.modules)]))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    code, mods = json.loads(r.stdout.strip().splitlines()[-1])
    return code, mods, r.stderr


def tops(mods: list[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_no_validate_onnx_run_imports_no_runtime_framework_or_parser(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    code, mods, err = run_and_list_modules([str(src), "-o", str(out), "--no-validate"])
    assert code == 0, err
    assert out.exists()
    assert not tops(mods) & set(HEAVY), sorted(tops(mods) & set(HEAVY))
    assert "rich.progress" not in mods  # no bar when stderr is not a terminal
    assert "bnfuse.report" in mods  # the report was printed: rich's table is the output


def test_validation_does_import_onnxruntime(tmp_path: Path) -> None:
    # the counterpart of the test above: the check would pass vacuously if nothing ran
    src = make_model(tmp_path / "m.onnx")
    code, mods, err = run_and_list_modules([str(src), "--json"])
    assert code == 0, err
    assert "onnxruntime" in tops(mods)
    assert "tensorflow" not in tops(mods)


def test_help_imports_neither_numpy_nor_frameworks() -> None:
    script = (
        "import sys, json, io, contextlib\n"
        "from bnfuse.cli import run\n"
        "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
        "    code = run(['--help'])\n"
        "print(json.dumps([code, 'MODEL' in buf.getvalue(), sorted(sys.modules)]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    code, shown, mods = json.loads(r.stdout)
    assert code == 0 and shown
    assert not tops(mods) & {"numpy", "onnx", "rich", *HEAVY}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.keras", b"not a zip at all", "not a .keras file (not a zip archive)"),
        ("m.h5", b"\x00" * 2048, "no HDF5 signature"),
        ("m.h5", b"", "empty file"),
        ("missing.keras", None, "no such file"),
    ],
)
def test_a_file_that_cannot_be_keras_is_refused_before_tensorflow(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    code, mods, err = run_and_list_modules([str(src), "-o", str(tmp_path / "f.keras")])
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bnfuse: error: {src}: "), err
    assert message in lines[0]
    assert "tensorflow" not in tops(mods) and "keras" not in tops(mods)
    assert not (tmp_path / "f.keras").exists()


def test_usage_error_is_one_line_exit_2(tmp_path: Path) -> None:
    src = make_model(tmp_path / "m.onnx")
    for args in ([str(src), "--no-such-flag"], [], [str(src), "--samples", "x"]):
        r = subprocess.run(
            [sys.executable, "-m", "bnfuse", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfuse: error: "), r.stderr
        assert r.stdout == ""
