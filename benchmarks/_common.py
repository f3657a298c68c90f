"""Helpers shared by the benchmark scripts, written once: onnxruntime sessions and its
offline optimizer, timing, random inputs, the machine description, one-line errors and
JSON-safe numbers.

Every script runs as a file, so its folder (benchmarks/) is first on ``sys.path`` and this
module is imported as ``from _common import ...``, like ``models``, ``_peers`` and
``_float64``. Nothing here imports onnxruntime or bnfuse at import time: the scripts that
measure start-up or memory decide when those are loaded.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ---------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------


@functools.cache
def ort() -> Any:
    """onnxruntime, its default logger quietened once (cached: a timed call that goes
    through here pays nothing for it)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def ort_session(path: Path, level: str, threads: int | None = None) -> Any:
    """A CPU session of ``path`` at the optimization ``level`` (a
    ``GraphOptimizationLevel`` name); ``threads``: intra-op threads with one inter-op
    thread (None: onnxruntime's defaults)."""
    rt = ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = getattr(rt.GraphOptimizationLevel, level)
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_outputs(
    path: Path, feeds: Mapping[str, np.ndarray], level: str = "ORT_DISABLE_ALL"
) -> list[np.ndarray]:
    """Every output of ``path`` on ``feeds`` (graph optimizations disabled by default: the
    reference a fold is compared against)."""
    return list(ort_session(path, level).run(None, dict(feeds)))


def ort_offline(src: Path, dst: Path, level: str = "ORT_ENABLE_BASIC") -> None:
    """onnxruntime as an offline optimizer: build a session of ``src`` at ``level`` with
    ``optimized_model_filepath = dst`` (its Conv/BN fusions live at the BASIC level)."""
    rt = ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = getattr(rt.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    rt.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------
# bnfuse, timing, inputs
# ---------------------------------------------------------------------------------------


def bnfuse_fold(src: Path, dst: Path) -> Any:
    """bnfuse as a user folds a file without validation (what ``--no-validate`` does)."""
    import bnfuse

    return bnfuse.fuse(src, dst, validate=False)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, after a ``gc.collect()`` outside the timing."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    """Standard-normal float32 inputs for the graph inputs that are not initializers;
    symbolic dimensions become ``batch``."""
    r = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
        feeds[vi.name] = r.normal(0, 1, shape).astype(np.float32)
    return feeds


def round_robin(
    sessions: Mapping[str, Any],
    feeds: Mapping[str, np.ndarray],
    seconds: float,
    min_rounds: int,
    order: list[str] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each ``sessions[k].run(None, feeds)``, timed round-robin with the order
    rotated every round (drift on a shared machine hits every session alike), for
    ``seconds`` and at least ``min_rounds`` rounds, with the garbage collector off."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions) if order is None else order
    inputs = dict(feeds)
    end = time.perf_counter() + seconds
    rounds = 0
    gc.disable()
    try:
        while rounds < min_rounds or time.perf_counter() < end:
            order = order[1:] + order[:1]
            for k in order:
                t0 = time.perf_counter()
                sessions[k].run(None, inputs)
                times[k].append(time.perf_counter() - t0)
            rounds += 1
    finally:
        gc.enable()
    return times


def session_feeds(sess: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs for an onnxruntime session, symbolic dimensions 1."""
    r = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        out[i.name] = r.normal(0, 1, shape).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> str | None:
    """The 1/5/15-minute load average ("1.23 0.98 0.50"), None where the OS has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def git(*args: str) -> str:
    """``git -C <checkout> args`` stdout, "" when git is missing or fails."""
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""


def bnfuse_provenance(pkg: Path) -> str:
    """Which bnfuse was timed: the checkout's commit (and whether bnfuse/ had edits)."""
    if pkg.resolve() != (ROOT / "bnfuse").resolve():
        return f"imported from {pkg} (not this checkout)"
    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "bnfuse")
    return f"git {commit}" + (" with uncommitted changes in bnfuse/" if dirty else "")


def bnfuse_version() -> str:
    """bnfuse's version and provenance, for a results file's Machine section."""
    import bnfuse

    return f"{bnfuse.__version__}, {bnfuse_provenance(Path(bnfuse.__file__).parent)}"


def machine_info() -> dict[str, str]:
    """The Machine section of the fold-speed and scale results: date, CPU, cores, load,
    OS and the versions of what is timed."""
    from bnfuse.bench import machine_info as bench_machine_info

    info = bench_machine_info()  # CPU model and usable cores, read the same way everywhere
    cpu, usable = info["cpu"], info["usable_cores"]
    return {
        "date": utc_now(),
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "load average (1/5/15 min) at start": load_average() or "?",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort().__version__,
        "bnfuse": bnfuse_version(),
    }


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 240 characters), for a table cell."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:240] if first else type(exc).__name__


def finite(x: Any) -> Any:
    """``x`` with every non-finite float (nested in dicts, lists, tuples) made None: JSON
    has no NaN or infinity."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x
