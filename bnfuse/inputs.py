"""Validation and benchmark inputs: seeded random feeds, or real data from an ``.npz``.

Imports numpy only (no model framework).

Conventions
-----------
* A *feed* is one ``{input name: array}`` dict; the model runs once per feed.
* Random feeds (:func:`random_feeds`) are one per sample. Floats are standard normal in
  the input's dtype (bfloat16 and other ``ml_dtypes`` floats included), integers are
  0..9, bools are fair coin flips.
* Symbolic dims (a ``str``, ``None`` or a negative int in :class:`~bnfuse.backend.InputSpec`):
  a symbolic leading dim (axis 0, the batch) is 1, or ``batch`` when given; any other
  symbolic dim must be given by ``input_shapes[name]`` (the input's full shape, as
  ``--input-shape NAME=1x3x224x224`` on the command line). When ``batch`` is given and
  axis 0 is symbolic, ``batch`` wins over axis 0 of ``input_shapes[name]``.
* Real data (:func:`load_feeds`): one array per input name. Each array is a whole batch,
  fed as-is: one array = one run. When the input's leading dim is fixed at ``k`` and the
  array has ``n*k`` rows, it is split along axis 0 into ``n`` runs of ``k`` rows. An array
  one rank short of the input gets a leading axis of 1 (a single example). Every input must
  give the same number of runs. Arrays are cast to the input's dtype when the cast is
  safe (same kind or wider kind, and the values survive the cast).
* Several sources: ``--inputs`` may be repeated, or name a directory, whose ``*.npz``
  files (sorted by name) are shards; the runs of all shards follow one another.
  :func:`iter_feeds` reads one shard at a time (BN statistics stream over them).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnfuse.backend import InputSpec
from bnfuse.errors import UsageError

__all__ = [
    "is_float_dtype",
    "iter_feeds",
    "load_feeds",
    "parse_input_shape",
    "random_feeds",
    "resolve_shape",
]

Dim = int | str | None


def is_float_dtype(dtype: np.dtype[Any]) -> bool:
    """True for numpy floats and ``ml_dtypes`` floats (bfloat16, float8 ...)."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or (dt.kind == "V" and "float" in dt.name)


def _is_symbolic(dim: Dim) -> bool:
    return dim is None or isinstance(dim, str) or (isinstance(dim, int) and dim < 0)


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _example(spec: InputSpec, batch: int | None) -> str:
    parts = []
    for axis, dim in enumerate(spec.shape):
        if not _is_symbolic(dim):
            parts.append(str(dim))
        elif axis == 0:
            parts.append(str(batch or 1))
        else:
            parts.append(f"<{dim}>" if isinstance(dim, str) and dim else f"<d{axis}>")
    return f"--input-shape {spec.name}={'x'.join(parts)}"


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (``,`` also separates dims) into ``(name, shape)``.

    The name is everything before the last ``=``; dims are positive integers.

    Raises:
        UsageError: the text is not of that form.
    """
    name, sep, dims = text.rpartition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(
            f"--input-shape {text!r}: expected NAME=DIMS, e.g. --input-shape x=1x3x224x224"
        )
    tokens = [t.strip() for t in re.split(r"[xX,]", dims.strip())]
    if not dims.strip() or any(not t.isdigit() for t in tokens):
        raise UsageError(
            f"--input-shape {text!r}: dims must be positive integers separated by 'x', "
            f"e.g. --input-shape {name}=1x3x224x224"
        )
    shape = tuple(int(t) for t in tokens)
    if any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {text!r}: every dim must be at least 1")
    return name, shape


def resolve_shape(
    spec: InputSpec,
    input_shapes: Mapping[str, Sequence[int]],
    batch: int | None = None,
) -> tuple[int, ...]:
    """The concrete shape to feed ``spec`` (see the module docstring for the rules).

    Raises:
        UsageError: a non-leading dim is symbolic and ``input_shapes`` does not give it, or
            the given shape does not fit the input's rank or fixed dims.
    """
    if spec.name in input_shapes:
        given = tuple(int(d) for d in input_shapes[spec.name])
        if len(given) != len(spec.shape):
            raise UsageError(
                f"--input-shape {spec.name}: got {len(given)} dims {_fmt_shape(given)}, "
                f"but input {spec.name!r} has rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, given, strict=True)):
            if got < 1:
                raise UsageError(f"--input-shape {spec.name}: dim {axis} must be at least 1")
            if not _is_symbolic(want) and want != got:
                raise UsageError(
                    f"--input-shape {spec.name}: dim {axis} is {got}, but input "
                    f"{spec.name!r} fixes it at {want} {_fmt_shape(spec.shape)}"
                )
        if batch is not None and given and _is_symbolic(spec.shape[0]):
            given = (batch, *given[1:])
        return given
    shape: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if not _is_symbolic(dim):
            shape.append(int(dim))  # type: ignore[arg-type]
        elif axis == 0:
            shape.append(batch if batch is not None else 1)
        else:
            label = repr(dim) if isinstance(dim, str) and dim else "?"
            raise UsageError(
                f"input {spec.name!r} has symbolic dim {label} at axis {axis} "
                f"{_fmt_shape(spec.shape)}; give its full shape with {_example(spec, batch)}"
            )
    return tuple(shape)


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    dt = np.dtype(spec.dtype)
    if is_float_dtype(dt):
        return rng.standard_normal(shape).astype(dt)
    if dt.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dt)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    raise UsageError(
        f"input {spec.name!r} has dtype {dt.name}, which bnfuse cannot generate random "
        "data for; pass real data with --inputs FILE.npz"
    )


def random_feeds(
    specs: Sequence[InputSpec],
    samples: int,
    seed: int,
    input_shapes: Mapping[str, Sequence[int]],
    batch: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """``samples`` seeded random feeds for a model with inputs ``specs``.

    Args:
        specs: the model's inputs.
        samples: number of feeds (runs) to make.
        seed: seed of the numpy generator; the same arguments give the same arrays.
        input_shapes: full concrete shapes for inputs with symbolic non-leading dims.
        batch: size of a symbolic leading dim (default 1).

    Raises:
        UsageError: a shape cannot be resolved, an ``input_shapes`` entry names no input,
            or an input's dtype cannot be generated.
    """
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    if batch is not None and batch < 1:
        raise UsageError("batch sizes must be at least 1")
    names = [s.name for s in specs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise UsageError(
            f"--input-shape names unknown input(s) {', '.join(map(repr, unknown))}; "
            f"model inputs: {', '.join(map(repr, names))}"
        )
    shapes = [resolve_shape(s, input_shapes, batch) for s in specs]
    rng = np.random.default_rng(seed)
    return [
        {s.name: _random_array(rng, s, shape) for s, shape in zip(specs, shapes, strict=True)}
        for _ in range(samples)
    ]


# --------------------------------------------------------------------------- real data


def _read_npz(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"--inputs {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):  # a plain .npy: fine for one-input models
            if len(specs) != 1:
                raise UsageError(
                    f"--inputs {path}: a .npy holds one array, but the model has "
                    f"{len(specs)} inputs; save an .npz with keys "
                    f"{', '.join(s.name for s in specs)}"
                )
            return {specs[0].name: data}
        with data:
            return {k: np.array(data[k]) for k in data.files}
    except UsageError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise UsageError(
                f"--inputs {path}: contains object arrays; refusing to unpickle "
                "(save plain numeric arrays with numpy.savez)"
            ) from None
        raise UsageError(f"--inputs {path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UsageError(
            f"--inputs {path}: not a readable .npz file ({type(exc).__name__}: {exc})"
        ) from None


def _cast(name: str, arr: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    src, dst = arr.dtype, np.dtype(dtype)
    if src == dst:
        return arr
    if src.kind in "OSUVMm" and not is_float_dtype(src):
        raise UsageError(f"--inputs: array {name!r} has dtype {src.name}; expected {dst.name}")
    src_rank = _kind_rank(src)
    dst_rank = _kind_rank(dst)
    if src_rank > dst_rank:
        raise UsageError(
            f"--inputs: array {name!r} has dtype {src.name}, which cannot be cast safely to "
            f"the input's {dst.name}"
        )
    with np.errstate(all="ignore"):
        out = arr.astype(dst)
    if dst_rank == 2 and src_rank == 2:  # integer narrowing: the values must survive
        if not np.array_equal(out.astype(np.int64), arr.astype(np.int64)):
            raise UsageError(
                f"--inputs: array {name!r} has values that do not fit the input's {dst.name}"
            )
    elif dst_rank == 3:  # to a float: no new infinities (e.g. float64 -> float16 overflow)
        src_f = arr.astype(np.float64) if src_rank == 3 else None
        new_inf = ~np.isfinite(out.astype(np.float64))
        if src_f is not None:
            new_inf &= np.isfinite(src_f)
        if np.any(new_inf):
            raise UsageError(
                f"--inputs: array {name!r} has values that overflow the input's {dst.name}"
            )
    return out


def _kind_rank(dt: np.dtype[Any]) -> int:
    if dt.kind == "b":
        return 1
    if dt.kind in "iu":
        return 2
    if is_float_dtype(dt):
        return 3
    return 4  # complex and anything else: never cast down from it


def _split_runs(spec: InputSpec, arr: np.ndarray) -> list[np.ndarray]:
    rank = len(spec.shape)
    if arr.ndim == rank - 1 and rank >= 1 and (_is_symbolic(spec.shape[0]) or spec.shape[0] == 1):
        arr = arr[np.newaxis, ...]  # a single example: add its batch axis
    if arr.ndim != rank:
        raise UsageError(
            f"--inputs: array {spec.name!r} has shape {_fmt_shape(arr.shape)}, but input "
            f"{spec.name!r} has rank {rank} {_fmt_shape(spec.shape)}"
        )
    for axis in range(1, rank):
        want = spec.shape[axis]
        if not _is_symbolic(want) and arr.shape[axis] != want:
            raise UsageError(
                f"--inputs: array {spec.name!r} has shape {_fmt_shape(arr.shape)}, but input "
                f"{spec.name!r} needs {_fmt_shape(spec.shape)} (dim {axis})"
            )
    if rank == 0 or _is_symbolic(spec.shape[0]):
        return [arr]
    k = int(spec.shape[0])  # type: ignore[arg-type]
    n = arr.shape[0]
    if n == 0 or n % k:
        raise UsageError(
            f"--inputs: array {spec.name!r} has {n} rows along axis 0, but input "
            f"{spec.name!r} has a fixed batch of {k}; give a multiple of {k} rows"
        )
    return [arr[i : i + k] for i in range(0, n, k)]


Source = str | os.PathLike[str] | Mapping[str, np.ndarray]


def shards(src: Source | Sequence[Source]) -> list[Source]:
    """The single sources ``src`` stands for: a directory's ``*.npz`` files sorted by
    name, each element of a list, or ``src`` itself.

    Raises:
        UsageError: a directory without ``.npz`` files, or an empty list.
    """
    if isinstance(src, Mapping):
        return [src]
    if not isinstance(src, str | os.PathLike):
        out = [s for one in src for s in shards(one)]
        if not out:
            raise UsageError("--inputs: no data given")
        return out
    path = Path(src)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not found:
            raise UsageError(f"--inputs {path}: directory holds no .npz shards")
        return list(found)
    return [path]


def iter_feeds(
    src: Source | Sequence[Source], specs: Sequence[InputSpec]
) -> Iterator[dict[str, np.ndarray]]:
    """The feeds of :func:`load_feeds`, read one shard at a time."""
    for one in shards(src):
        yield from load_feeds(one, specs)


def load_feeds(
    src: Source | Sequence[Source],
    specs: Sequence[InputSpec],
) -> list[dict[str, np.ndarray]]:
    """Feeds from real data: an ``.npz`` (or ``.npy`` for one-input models) or a mapping,
    or several of them (a list, or a directory of ``.npz`` shards).

    Keys are input names; extra keys are ignored. See the module docstring for how arrays
    become runs. Files are read with ``allow_pickle=False``.

    Raises:
        UsageError: unreadable file, object arrays, a missing input, a shape that does not
            fit the input, an unsafe cast, or inputs that give different numbers of runs.
    """
    if isinstance(src, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in src.items()}
        origin = "--inputs"
        for k, v in arrays.items():
            if v.dtype.kind == "O":
                raise UsageError(f"--inputs: array {k!r} is an object array; pass numeric arrays")
    elif isinstance(src, str | os.PathLike) and not Path(src).is_dir():
        path = Path(src)
        arrays = _read_npz(path, specs)
        origin = f"--inputs {path}"
    else:  # several sources: a list, or a directory of shards
        return [f for one in shards(src) for f in load_feeds(one, specs)]
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(
            f"{origin}: no array for input(s) {', '.join(map(repr, missing))}; "
            f"expected keys: {', '.join(map(repr, names))} (found: "
            f"{', '.join(map(repr, sorted(arrays))) or 'none'})"
        )
    runs: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        arr = _cast(spec.name, arrays[spec.name], spec.dtype)
        runs[spec.name] = _split_runs(spec, arr)
    counts = {name: len(r) for name, r in runs.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise UsageError(f"{origin}: inputs give different numbers of runs ({detail})")
    n_runs = next(iter(counts.values()), 0)
    if n_runs == 0:
        raise UsageError(f"{origin}: the model has no inputs to feed")
    return [{name: runs[name][i] for name in names} for i in range(n_runs)]
