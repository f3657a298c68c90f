import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest

import bnfuse.onnx.fuse


@pytest.fixture(autouse=True)
def _check_graph_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ONNX fold in the tests checks its incrementally kept index against a fresh one."""
    monkeypatch.setattr(bnfuse.onnx.fuse, "CHECK_INDEX", True)
