"""One driver order (bnfuse/driver.py): every sample Keras model and its ONNX export end
with the same folds: the same BNs, each folded in the same direction.

The ONNX side is the shipped twin for a Keras 3 sample (``sample_models/*.onnx``, made by
Keras's own exporter) and, for the Keras 2 ``.h5``, a fresh tf2onnx export made exactly
as ``bnfuse model.h5 -o x.onnx`` does, minus its fold pass. An exported normalization is
named by the Keras layer it came from: tf2onnx names its nodes ``<model>/<layer>/...``,
and Keras 3 adds ``_1`` to every name it traces (``bn_2`` becomes ``bn_2_1``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("onnxruntime")

import bnfuse
from bnfuse.result import FuseResult

pytestmark = pytest.mark.keras

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"

#: BNs of a Keras sample that its export no longer has: the exporter (tf2onnx's own
#: optimizer) folded them into their Conv already, so the ONNX pass never sees them.
FOLDED_BY_EXPORTER = {"digits_cnn": {"bn_1"}}


def directions(res: FuseResult) -> dict[str, str]:
    return {f.bn: f.direction for f in res.folds}


def keras_layer_of(onnx_name: str, keras_names: set[str]) -> str:
    """The Keras layer an exported node came from (exactly one must match)."""
    parts = onnx_name.split("/")
    found = {k for k in keras_names if k in parts or f"{k}_1" in parts}
    assert len(found) == 1, (onnx_name, found)
    return found.pop()


def same_folds(keras_res: FuseResult, onnx_res: FuseResult, missing: set[str]) -> None:
    want = directions(keras_res)
    assert want, "the sample folds nothing: the comparison would be empty"
    names = set(want) | {r.bn for r in keras_res.refusals}
    got = {keras_layer_of(bn, names): d for bn, d in directions(onnx_res).items()}
    refused = {keras_layer_of(r.bn, names) for r in onnx_res.refusals}
    assert not refused & set(want), f"the ONNX pass refused {refused & set(want)}"
    assert got == {bn: d for bn, d in want.items() if bn not in missing}
    assert missing <= set(want)  # the exporter's folds are ones bnfuse makes too


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_keras_sample_and_its_onnx_twin_fold_the_same(name: str) -> None:
    keras_res = bnfuse.fuse(SAMPLES / f"{name}.keras", validate=False)
    onnx_res = bnfuse.fuse(SAMPLES / f"{name}.onnx", validate=False)
    same_folds(keras_res, onnx_res, FOLDED_BY_EXPORTER.get(name, set()))


def test_keras2_sample_and_its_tf2onnx_export_fold_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tf_keras")
    pytest.importorskip("tf2onnx")
    from bnfuse.keras import keras2_io
    from bnfuse.keras.backend import KerasBackend

    def unfolded(tmp: Path, path: Path) -> list[str]:  # the export as tf2onnx wrote it
        shutil.copyfile(tmp, path)
        return []

    monkeypatch.setattr(keras2_io, "fold_export", unfolded)
    src = SAMPLES / "digits_mlp_k2.h5"
    model: Any = KerasBackend().load(src)
    out = tmp_path / "digits_mlp_k2.onnx"
    keras2_io.export_onnx(model, out)
    keras_res = bnfuse.fuse(src, validate=False)
    onnx_res = bnfuse.fuse(out, validate=False)
    same_folds(keras_res, onnx_res, set())
