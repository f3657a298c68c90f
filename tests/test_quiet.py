"""Quiet by default: TensorFlow's start-up chatter (absl, oneDNN, CUDA lines written by
its C++ code to descriptor 2) does not reach the user unless ``-v``; bnfuse's own lines do."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_mlp.keras"


def bnfuse(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``bnfuse ARGS`` in a fresh interpreter (``prelude`` runs first), TF's own log
    level variables unset, as a user's shell would have them."""
    script = prelude + "\nfrom bnfuse.cli import main\nmain(" + repr(list(args)) + ")\n"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TF_CPP")}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=ROOT,
        env=env,
    )


CHATTER = textwrap.dedent(
    """
    import os
    import bnfuse.api as api
    real_backend = api._load_backend
    def load_backend(name):  # (TensorFlow itself is imported in there, not here)
        backend = real_backend(name)
        if name == "keras" and not hasattr(type(backend), "real_load"):
            cls = type(backend)
            cls.real_load = cls.load
            def load(self, path, **kw):
                os.write(2, b"I0000 native chatter from C++\\n")  # as TensorFlow does
                return self.real_load(path, **kw)
            cls.load = load
        return backend
    api._load_backend = load_backend
    """
)


@pytest.mark.keras
def test_keras_run_prints_nothing_on_stderr_but_its_own_lines(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    out = tmp_path / "f.keras"
    r = bnfuse(str(SAMPLE), "-o", str(out), prelude=CHATTER)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert out.exists() and "Validation passed" in r.stdout
    # an error after TensorFlow was imported: bnfuse's one line still reaches the user
    r = bnfuse(str(SAMPLE), "--skip", "no-such-rule", prelude=CHATTER)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfuse: error: --skip: unknown rule(s)")


@pytest.mark.keras
def test_verbose_shows_tensorflows_lines(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    r = bnfuse(str(SAMPLE), "--dry-run", "--no-validate", "-v", prelude=CHATTER)
    assert r.returncode == 0, r.stderr
    assert "native chatter from C++" in r.stderr


def test_quiet_native_stderr_keeps_bnfuse_lines(tmp_path: Path) -> None:
    """Without TensorFlow: descriptor 2 goes to a sink, the yielded stream to the user."""
    script = textwrap.dedent(
        """
        import os, sys
        from bnfuse.quiet import quiet_native_stderr
        with quiet_native_stderr() as err:
            os.write(2, b"native\\n")
            print("python-level warning", file=sys.stderr)
            err.write("bnfuse: mine\\n")
        os.write(2, b"after\\n")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert r.stderr.splitlines() == ["bnfuse: mine", "after"]
