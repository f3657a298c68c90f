"""Nothing lost: the input is never modified, outputs appear atomically, an interrupted
write leaves nothing behind, a failed validation writes nothing unless forced."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
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
    # A process started with SIGINT ignored (a background job, as a CI runner may start
    # the test run) passes that on to its children, and Python then never raises
    # KeyboardInterrupt: the child restores the default handler itself, so the test does
    # not depend on how it was started.
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
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


def test_interrupt_test_passes_when_started_with_sigint_ignored(tmp_path: Path) -> None:
    """The test above, run by a pytest whose process ignores SIGINT (inherited by the
    bnfuse child it starts)."""
    code = (
        "import signal, sys, pytest\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
        f"'--rootdir', {str(Path(__file__).parents[1])!r}, "
        f"{__file__ + '::test_interrupted_write_leaves_no_file'!r}]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 0, r.stdout[-2000:]
    assert "2 passed" in r.stdout


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


@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_permissions_of_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_027: int
) -> None:
    """Written through a temporary file, but not with mkstemp's private 0o600: a fused
    model, its external data and a report get what any new file gets under the umask."""
    from bnfuse.onnx.storage import files as storage_files

    src = make(tmp_path / "m.onnx")
    res = bnfuse.fuse(src, tmp_path / "f.onnx", validate=False)
    assert _mode(tmp_path / "f.onnx") == 0o640
    from bnfuse.report_files import write_report

    write_report(res, tmp_path / "r.json")
    assert _mode(tmp_path / "r.json") == 0o640
    monkeypatch.setattr(storage_files, "FILE_PATH_THRESHOLD", 1)  # header + external data
    bnfuse.fuse(src, tmp_path / "e.onnx", validate=False)
    assert _mode(tmp_path / "e.onnx") == 0o640
    assert _mode(tmp_path / "e.onnx.data") == 0o640


def test_replacing_an_output_keeps_its_permissions(tmp_path: Path, umask_027: int) -> None:
    src = make(tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    out.write_bytes(b"old")
    out.chmod(0o604)
    bnfuse.fuse(src, out, validate=False)
    assert _mode(out) == 0o604
    assert onnx.load(str(out)).graph.node  # and it is the new model


def test_writer_cuts_what_an_existing_file_held_beyond_the_model(tmp_path: Path) -> None:
    """The writer opens without O_TRUNC (see atomic_path); it must still cut the file."""
    from bnfuse.onnx.storage import serialize

    model = onnx.load(str(make(tmp_path / "m.onnx")))
    path = tmp_path / "w.onnx"
    path.write_bytes(b"\xff" * (len(model.SerializeToString()) + 4096))
    serialize.write(model, path)
    assert path.read_bytes() == serialize.to_bytes(model)
    assert onnx.load(str(path)) == model


def test_output_is_writable_while_written_then_gets_its_final_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only mode (a 0o444 file replaced, or umask 0o222) is set only after the
    write: the writers reopen the temporary file, which must stay writable until then
    (root could write it anyway, so the mode is checked, not the open)."""
    from bnfuse.onnx.storage import serialize

    src = make(tmp_path / "m.onnx")
    seen: list[int] = []
    real = serialize.write

    def spy(model, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(serialize, "write", spy)
    out = tmp_path / "ro.onnx"
    out.write_bytes(b"old")
    out.chmod(0o444)
    bnfuse.fuse(src, out, validate=False)
    assert seen[-1] & stat.S_IWUSR and _mode(out) == 0o444
    assert onnx.load(str(out)).graph.node
    old = os.umask(0o222)
    try:
        bnfuse.fuse(src, tmp_path / "new.onnx", validate=False)
    finally:
        os.umask(old)
    assert seen[-1] & stat.S_IWUSR and _mode(tmp_path / "new.onnx") == 0o444


def test_output_may_be_a_hard_link_to_the_input_but_not_a_symlink(tmp_path: Path) -> None:
    """Writing replaces the output's directory entry: a hard link to the input is
    replaced and the input keeps its bytes; a symbolic link would lead to the input."""
    from bnfuse.errors import UsageError

    src = make(tmp_path / "m.onnx")
    before = digest(src)
    hard = tmp_path / "hard.onnx"
    os.link(src, hard)
    res = bnfuse.fuse(src, hard, validate=False)
    assert res.written and digest(src) == before and digest(hard) != before
    soft = tmp_path / "soft.onnx"
    soft.symlink_to(src)
    with pytest.raises(UsageError, match="would overwrite the input"):
        bnfuse.fuse(src, soft, validate=False)
    assert digest(src) == before
