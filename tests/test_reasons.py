"""The table of refusal reasons (bnfuse/reasons.py): stable codes, one wording per reason
across backends, the schema doc in step, and a known code, carried by the reason from
where it was made, on every refusal the fold tests produce."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx_util import GraphBuilder

from bnfuse import reasons
from bnfuse.backend import FuseOptions
from bnfuse.keep import kept_reason
from bnfuse.onnx.backend import OnnxBackend
from bnfuse.reasons import CODES, PRECEDENCE, Reason, code_for, overflow, refusal, tagged

ROOT = Path(__file__).resolve().parents[1]

#: The codes every branch of bnfuse agreed on (the cross-branch contract); a code may be
#: added, none renamed or removed.
CONTRACT = {
    "shared-output",
    "activation-between",
    "axis-mismatch",
    "padding",
    "not-constant",
    "training-mode",
    "unsafe-statistics",
    "overflow",
    "excluded",
    "unsupported-layer",
    "no-partner",
    "dtype",
    "rule-skipped",
    "other",
}


def test_codes_are_the_contract_kebab_case() -> None:
    assert set(CODES) == CONTRACT
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", c) for c in CODES)
    assert all(CODES[c].strip() for c in CODES)
    assert sorted(PRECEDENCE) == sorted(CODES)  # every code has one weight


def test_schema_doc_lists_every_code_with_its_meaning() -> None:
    doc = (ROOT / "docs" / "report-schema.md").read_text(encoding="utf-8")
    section = doc.split("### Refusal codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| ([a-z-]+) \| (.+) \|$", section, flags=re.M))
    del rows["code"]  # the header
    assert rows == CODES
    assert "| `code` | string |" in doc.split("## `refusals[]`", 1)[1].split("\n## ", 1)[0]


def test_an_untagged_sentence_gets_other_whatever_it_says() -> None:
    """Nothing reads the prose: only a tag gives a code (a sentence that looks like a
    known reason still gets ``other``, which the fold tests below forbid)."""
    assert code_for("a sentence bnfuse never writes") == "other"
    assert code_for(str(reasons.PADDING)) == "other"
    assert code_for("Conv output 'c' has other consumers") == "other"
    made = refusal("bn", "variance + epsilon <= 0: BN is undefined")  # type: ignore[arg-type]
    assert made.code == "other"


def test_shared_wordings_and_helpers_carry_their_codes() -> None:
    assert (reasons.PADDING.code, reasons.TRANSPOSE_SHIFT.code) == ("padding", "padding")
    assert reasons.EXCLUDED.code == "excluded"
    assert kept_reason("bn_*").code == "excluded"
    assert kept_reason("bn_*") == "kept unfolded: matches --keep 'bn_*'"
    exc = OverflowError("x")
    exc.dtype = "float16"  # type: ignore[attr-defined]
    r = overflow("conv", exc)
    assert (r, r.code) == ("folded values of 'conv' overflow float16 (fold refused)", "overflow")


def test_a_reworded_or_joined_reason_keeps_a_code() -> None:
    inner = tagged("not-constant", "'w' is a graph input, not a constant")
    outer = inner.reworded(f"Conv weight {inner}")
    assert (outer, outer.code) == (
        "Conv weight 'w' is a graph input, not a constant",
        "not-constant",
    )
    axis = tagged("axis-mismatch", "BN axis 1 is not the channel axis of 'lin'")
    act = tagged("activation-between", "activation between layer and BN")
    skipped = tagged("rule-skipped", "forward folding is disabled")
    # the weightier code names the joined sentence, whichever side it came from
    assert Reason.joined(f"{act}; forward: {reasons.PADDING}", act, reasons.PADDING).code == (
        "activation-between"
    )
    assert Reason.joined(f"{axis}; forward: {skipped}", axis, skipped).code == "rule-skipped"
    assert Reason.joined("x", axis, axis).code == "axis-mismatch"


def test_a_tagged_reason_keeps_its_code_and_text() -> None:
    r = tagged("not-constant", "a sentence bnfuse never writes")
    assert r == "a sentence bnfuse never writes" and r.code == "not-constant"
    assert code_for(r) == "not-constant"
    made = refusal("bn", r, rule="conv-bn")
    assert (made.reason, made.code, made.rule) == (str(r), "not-constant", "conv-bn")
    assert type(made.reason) is str  # the result holds plain text (JSON, pickling)
    with pytest.raises(ValueError, match="unknown refusal code 'bogus'"):
        tagged("bogus", "x")
    with pytest.raises(ValueError, match="unknown refusal code 'bogus'"):
        Reason("bogus", "x")


def test_one_wording_per_shared_reason_across_backends() -> None:
    from bnfuse.onnx import rules as onnx_rules

    assert onnx_rules.PAD_REASON is reasons.PADDING
    keras_rules = ROOT / "bnfuse" / "keras" / "rules.py"
    keras_fuse = ROOT / "bnfuse" / "keras" / "fuse.py"
    for path in (keras_rules, keras_fuse, ROOT / "bnfuse" / "onnx" / "fuse.py"):
        text = path.read_text(encoding="utf-8")
        for wording in (reasons.PADDING, reasons.EXCLUDED, reasons.TRANSPOSE_SHIFT):
            assert f'"{wording}"' not in text, f"{path.name} spells out {wording!r}"


def test_json_gives_the_code_beside_the_reason(tmp_path: Path) -> None:
    import bnfuse

    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.conv(x, 3, 4, [3, 3])
    b.output(b.bn(c, 4, name="bn"))
    b.output(b.node("Relu", [c]))
    res = OnnxBackend().fuse(b.model(), FuseOptions(forward=False))
    assert [(r.bn, r.code) for r in res.refusals] == [("bn", "shared-output")]
    path = tmp_path / "m.onnx"
    onnx.save(b.model(), path)
    data = bnfuse.fuse(path, forward=False, validate=False).to_dict()
    assert [(r["bn"], r["code"]) for r in data["refusals"]] == [("bn", "shared-output")]
    assert data["refusals"][0]["reason"] == f"Conv output {c!r} has other consumers"


FOLD_TESTS = {
    "onnx": [
        "tests/test_onnx_refusals.py",
        "tests/test_onnx_refusal_reasons.py",
        "tests/test_onnx_forward.py",
        "tests/test_onnx_backward.py",
        "tests/test_onnx_affine.py",
        "tests/test_onnx_scopes.py",
        "tests/test_bad_input.py",
    ],
    "keras": ["tests/keras/test_keras_folds.py", "tests/keras/test_keras_refusal_reasons.py"],
}


@pytest.mark.parametrize(
    "group", ["onnx", pytest.param("keras", marks=[pytest.mark.keras, pytest.mark.slow])]
)
def test_every_refusal_of_the_fold_tests_has_a_known_code(group: str, tmp_path: Path) -> None:
    """Run the fold tests with every Refusal recorded (tests/refusal_recorder.py): each
    was made by :func:`bnfuse.reasons.refusal` from a reason tagged where it was written
    (a plain sentence, or a Refusal built by hand, would fail here), with a code from
    the table, never empty and never ``other``; one sentence, one code."""
    if group == "keras":
        pytest.importorskip("tensorflow")
    record = tmp_path / "refusals.json"
    env = dict(os.environ, BNFUSE_RECORD_REFUSALS=str(record))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    args = ["-q", "-p", "no:cacheprovider", "-p", "refusal_recorder", "-m", "not slow"]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", *args, *FOLD_TESTS[group]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    seen = [tuple(x) for x in json.loads(record.read_text(encoding="utf-8"))]
    assert len(seen) >= (60 if group == "onnx" else 20)  # the run really refused things
    untagged = [(reason, code) for reason, code, tagged in seen if not tagged]
    assert not untagged, untagged
    unknown = [(reason, code) for reason, code, _ in seen if code not in CODES or code == "other"]
    assert not unknown, unknown
    texts = [reason for reason, _, _ in seen]
    assert len(set(texts)) == len(texts), "a sentence with two codes"
