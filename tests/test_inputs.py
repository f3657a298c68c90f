"""Validation inputs: random feeds (dtypes, symbolic dims, --input-shape) and .npz data."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bnfuse.backend import InputSpec
from bnfuse.errors import UsageError
from bnfuse.inputs import load_feeds, parse_input_shape, random_feeds, resolve_shape


def spec(name: str, dtype: object, *shape: int | str | None) -> InputSpec:
    return InputSpec(name, np.dtype(dtype), tuple(shape))  # type: ignore[arg-type]


# ------------------------------------------------------------------ random feeds


def test_random_feeds_dtypes_shapes_and_values() -> None:
    specs = [
        spec("f32", np.float32, 1, 3, 4, 4),
        spec("f16", np.float16, 2, 5),
        spec("f64", np.float64, 7),
        spec("bf16", ml_dtypes.bfloat16, 1, 8),
        spec("i64", np.int64, 1, 6),
        spec("u8", np.uint8, 3),
        spec("b", np.bool_, 4, 4),
    ]
    feeds = random_feeds(specs, samples=3, seed=0, input_shapes={})
    assert len(feeds) == 3
    for feed in feeds:
        assert list(feed) == [s.name for s in specs]
        for s in specs:
            assert feed[s.name].dtype == s.dtype, s.name
            assert feed[s.name].shape == s.shape, s.name
        assert np.all((feed["i64"] >= 0) & (feed["i64"] <= 9))
        assert np.all(feed["u8"] <= 9)
    big = random_feeds([spec("x", np.float32, 20000)], 1, 0, {})[0]["x"]
    assert abs(float(big.mean())) < 0.05 and 0.95 < float(big.std()) < 1.05  # standard normal
    bools = random_feeds([spec("b", np.bool_, 4000)], 1, 0, {})[0]["b"]
    assert 0.4 < float(bools.mean()) < 0.6
    ints = random_feeds([spec("i", np.int32, 4000)], 1, 0, {})[0]["i"]
    assert set(np.unique(ints)) == set(range(10))


def test_random_feeds_are_seeded_and_samples_differ() -> None:
    specs = [spec("x", np.float32, 1, 4)]
    a = random_feeds(specs, 2, seed=1, input_shapes={})
    b = random_feeds(specs, 2, seed=1, input_shapes={})
    c = random_feeds(specs, 2, seed=2, input_shapes={})
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])
    np.testing.assert_array_equal(a[1]["x"], b[1]["x"])
    assert not np.array_equal(a[0]["x"], a[1]["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])


@pytest.mark.parametrize("lead", ["N", None, -1, "batch_size"])
def test_symbolic_leading_dim_defaults_to_one_or_batch(lead: str | int | None) -> None:
    s = spec("x", np.float32, lead, 3, 8)
    assert random_feeds([s], 1, 0, {})[0]["x"].shape == (1, 3, 8)
    assert random_feeds([s], 1, 0, {}, batch=4)[0]["x"].shape == (4, 3, 8)


def test_fixed_leading_dim_is_kept() -> None:
    s = spec("x", np.float32, 2, 3)
    assert random_feeds([s], 1, 0, {})[0]["x"].shape == (2, 3)


@pytest.mark.parametrize("dim", ["height", None, -1])
def test_symbolic_inner_dim_needs_input_shape(dim: str | int | None) -> None:
    s = spec("image", np.float32, "N", 3, dim, 224)
    with pytest.raises(UsageError) as exc:
        random_feeds([s], 1, 0, {})
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'image'" in msg and "axis 2" in msg
    assert "--input-shape image=1x3x" in msg
    if dim == "height":
        assert "'height'" in msg and "<height>" in msg


def test_input_shapes_override_symbolic_dims() -> None:
    s = spec("image", np.float32, "N", 3, "H", "W")
    feed = random_feeds([s], 1, 0, {"image": (2, 3, 32, 48)})[0]
    assert feed["image"].shape == (2, 3, 32, 48)
    # batch wins over axis 0 of the given shape when axis 0 is symbolic
    assert random_feeds([s], 1, 0, {"image": (2, 3, 32, 48)}, batch=5)[0]["image"].shape == (
        5,
        3,
        32,
        48,
    )


@pytest.mark.parametrize(
    ("given", "fragment"),
    [((1, 3, 32), "rank 4"), ((1, 4, 32, 32), "fixes it at 3"), ((1, 3, 0, 32), "at least 1")],
)
def test_input_shapes_must_fit_static_dims(given: tuple[int, ...], fragment: str) -> None:
    s = spec("x", np.float32, "N", 3, "H", "W")
    with pytest.raises(UsageError, match=fragment):
        resolve_shape(s, {"x": given})


def test_input_shapes_for_unknown_input_is_refused() -> None:
    with pytest.raises(UsageError, match=r"unknown input.*'y'"):
        random_feeds([spec("x", np.float32, 1, 3)], 1, 0, {"y": (1, 3)})


def test_unsupported_dtype_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--inputs"):
        random_feeds([spec("s", np.str_, 1)], 1, 0, {})


def test_samples_must_be_positive() -> None:
    with pytest.raises(UsageError):
        random_feeds([spec("x", np.float32, 1)], 0, 0, {})


# ------------------------------------------------------------------ --input-shape


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x=1x3x224x224", ("x", (1, 3, 224, 224))),
        ("input:0=1X3", ("input:0", (1, 3))),
        (" x = 2,5 ", ("x", (2, 5))),
        ("a=b=7", ("a=b", (7,))),
    ],
)
def test_parse_input_shape(text: str, expected: tuple[str, tuple[int, ...]]) -> None:
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize(
    "text", ["x", "=1x3", "x=", "x=1x", "x=1xax3", "x=1x-3", "x=0x3", "x=1.5x3", "x=1x x3"]
)
def test_parse_input_shape_malformed(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_input_shape(text)
    assert "\n" not in str(exc.value)
    assert "--input-shape" in str(exc.value)


# ------------------------------------------------------------------ real data


def test_load_npz_happy_path(tmp_path: Path) -> None:
    x = np.arange(2 * 3, dtype=np.float64).reshape(2, 3)
    ids = np.array([[1, 2]], dtype=np.int64)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, ids=ids, labels=np.array([0, 1]))  # extra keys are ignored
    specs = [spec("x", np.float32, "N", 3), spec("ids", np.int32, "N", 2)]
    feeds = load_feeds(path, specs)
    assert len(feeds) == 1  # symbolic batch: the whole array is one run
    assert feeds[0]["x"].dtype == np.float32 and feeds[0]["x"].shape == (2, 3)
    np.testing.assert_array_equal(feeds[0]["x"], x.astype(np.float32))
    assert feeds[0]["ids"].dtype == np.int32
    assert load_feeds(str(path), specs)[0]["x"].shape == (2, 3)  # str paths work too


def test_fixed_batch_splits_rows_into_runs() -> None:
    x = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    feeds = load_feeds({"x": x}, [spec("x", np.float32, 2, 2)])
    assert len(feeds) == 3
    np.testing.assert_array_equal(feeds[1]["x"], x[2:4])
    with pytest.raises(UsageError, match="multiple of 2"):
        load_feeds({"x": x[:5]}, [spec("x", np.float32, 2, 2)])


def test_single_example_gets_a_batch_axis() -> None:
    feeds = load_feeds({"x": np.zeros((3, 4), np.float32)}, [spec("x", np.float32, 1, 3, 4)])
    assert feeds[0]["x"].shape == (1, 3, 4)


def test_inputs_must_agree_on_run_count() -> None:
    specs = [spec("a", np.float32, 1, 2), spec("b", np.float32, 1, 2)]
    with pytest.raises(UsageError, match="different numbers of runs"):
        load_feeds({"a": np.zeros((3, 2)), "b": np.zeros((2, 2))}, specs)


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UsageError, match="contains object arrays; refusing to unpickle"):
        load_feeds(path, [spec("x", np.float32, "N", 2)])


def test_npz_missing_key_lists_expected_names(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, wrong=np.zeros((1, 3), np.float32))
    with pytest.raises(UsageError) as exc:
        load_feeds(path, [spec("x", np.float32, "N", 3), spec("y", np.float32, "N", 3)])
    msg = str(exc.value)
    assert "'x'" in msg and "'y'" in msg and "'wrong'" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"hello world", b"PK\x03\x04garbage"])
def test_unreadable_npz_is_a_usage_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=r"bad\.npz"):
        load_feeds(path, [spec("x", np.float32, "N", 3)])


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_feeds(tmp_path / "nope.npz", [spec("x", np.float32, "N", 3)])


def test_npy_is_accepted_for_one_input_models(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 3), np.float32))
    assert load_feeds(path, [spec("x", np.float32, "N", 3)])[0]["x"].shape == (2, 3)
    with pytest.raises(UsageError, match="one array"):
        load_feeds(path, [spec("x", np.float32, "N", 3), spec("y", np.float32, "N", 3)])


@pytest.mark.parametrize(
    ("arr", "dtype", "fragment"),
    [
        (np.array([[0.5, 1.5]]), np.int64, "cannot be cast safely"),
        (np.array([[300, 1]]), np.uint8, "do not fit"),
        (np.array([[1e6, 1.0]]), np.float16, "overflow"),
    ],
)
def test_unsafe_casts_are_refused(arr: np.ndarray, dtype: object, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        load_feeds({"x": arr}, [spec("x", dtype, "N", 2)])


def test_safe_casts_happen() -> None:
    feeds = load_feeds(
        {"x": np.array([[1, 2]], np.int64), "m": np.array([[True, False]])},
        [spec("x", ml_dtypes.bfloat16, "N", 2), spec("m", np.float32, "N", 2)],
    )
    assert feeds[0]["x"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(feeds[0]["m"], [[1.0, 0.0]])


def test_wrong_inner_shape_is_refused() -> None:
    with pytest.raises(UsageError, match="dim 1"):
        load_feeds({"x": np.zeros((1, 4))}, [spec("x", np.float32, "N", 3)])


def test_shards_directory_and_list_stream_in_order(tmp_path: Path) -> None:
    from bnfuse.inputs import iter_feeds, shards

    s = [spec("x", np.float32, None, 2)]
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        np.savez(d / f"p{i}.npz", x=np.full((i + 1, 2), i, np.float32))
    (d / "notes.txt").write_text("ignored")
    assert [p.name for p in shards(d)] == ["p0.npz", "p1.npz", "p2.npz"]  # type: ignore[union-attr]
    whole = load_feeds(d, s)
    assert [f["x"].shape[0] for f in whole] == [1, 2, 3]
    assert [int(f["x"][0, 0]) for f in iter_feeds([d / "p2.npz", d], s)] == [2, 0, 1, 2]
    lazy = iter_feeds([d / "p0.npz", tmp_path / "missing.npz"], s)
    assert int(next(lazy)["x"][0, 0]) == 0  # one shard at a time: the bad one not read yet
    with pytest.raises(UsageError, match="no such file"):
        next(lazy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"no \.npz shards"):
        load_feeds(empty, s)
    with pytest.raises(UsageError, match="no data"):
        load_feeds([], s)
