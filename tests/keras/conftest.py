"""Keras backend tests: skipped as a whole when tensorflow is not installed."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    collect_ignore_glob = ["test_*.py"]
