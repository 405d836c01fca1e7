"""jaxreg.datasets: MNIST from IDX files the test writes, npz archives, pair samplers."""

from __future__ import annotations

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import datasets

from helpers import assert_vmap_matches_loop, shared_data


def _write_idx(path, array: np.ndarray, *, compress: bool = False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    array = np.asarray(array)
    if array.dtype == np.int32:
        array = array.astype(">i4")
    if array.dtype == np.float32:
        array = array.astype(">f4")
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _fake_mnist(folder, *, compress: bool):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "y_train": np.array([5, 7, 5, 1, 5, 7], np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": np.array([7, 5, 5], np.uint8),
    }
    suffix = ".gz" if compress else ""
    for key, stem in datasets._MNIST_FILES.items():
        _write_idx(folder / (stem + suffix), arrays[key], compress=compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist_from_idx_files(tmp_path, compress):
    arrays = _fake_mnist(tmp_path, compress=compress)
    data = datasets.load_mnist(tmp_path)
    for key, expected in arrays.items():
        np.testing.assert_array_equal(getattr(data, key), expected)
        assert getattr(data, key).dtype == np.uint8


def test_read_idx_other_types_and_npz(tmp_path):
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7.0
    np.testing.assert_array_equal(datasets.read_idx(_write_idx(tmp_path / "f.idx", values)), values)
    ints = np.array([-5, 0, 70000], np.int32)
    np.testing.assert_array_equal(datasets.read_idx(_write_idx(tmp_path / "i.idx", ints)), ints)
    arrays = _fake_mnist(tmp_path, compress=False)
    np.savez(tmp_path / "mnist.npz", **arrays)
    np.testing.assert_array_equal(datasets.load_mnist(tmp_path / "mnist.npz").y_test, arrays["y_test"])


def test_bad_dataset_files_name_the_problem(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(datasets.DatasetReadError, match=r"shape \(10, 28, 28\).*holds 100"):
        datasets.read_idx(bad)
    text = tmp_path / "t.idx"
    text.write_text("hello world")
    with pytest.raises(datasets.DatasetReadError, match="not an IDX file"):
        datasets.read_idx(text)
    broken_gzip = tmp_path / "b.gz"
    broken_gzip.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abcd")[:-6])
    with pytest.raises(datasets.DatasetReadError, match="gzip"):
        datasets.read_idx(broken_gzip)
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((1, 2, 2)))
    with pytest.raises(datasets.DatasetReadError, match="lacks"):
        datasets.load_mnist(tmp_path / "partial.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="MNIST"):
        datasets.load_mnist(empty)
    with pytest.raises(FileNotFoundError):
        datasets.load_mnist(tmp_path / "missing.npz")


def test_pair_sampler_draws_from_the_pools_reproducibly():
    images = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 3, 3), np.float32)
    labels = (np.arange(5)[:, None, None] * np.ones((5, 3, 3))).astype(np.int32)
    sample = jax.jit(datasets.pair_sampler(images, batch_size=64, labels=labels))
    a, b = sample(jax.random.key(1)), sample(jax.random.key(1))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # Each image is constant = its index, and its label map repeats the index.
    np.testing.assert_array_equal(a["moving"][:, 0, 0], a["moving_labels"][:, 0, 0])
    assert set(np.asarray(a["moving"][:, 0, 0]).astype(int)) <= set(range(5))
    assert len(set(np.asarray(a["moving"][:, 0, 0]).astype(int))) >= 4  # draws spread over the pool
    assert not np.array_equal(sample(jax.random.key(2))["moving"], a["moving"])
    # vmap over keys equals drawing one batch per key.
    keys = jax.random.split(jax.random.key(3), 3)
    assert_vmap_matches_loop(lambda k: datasets.pair_sampler(images, batch_size=4)(k)["fixed"], keys)
    with pytest.raises(TypeError, match="floating point"):
        datasets.pair_sampler(images.astype(np.uint8), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        datasets.pair_sampler(images, batch_size=0)


def test_eval_pairs_follow_the_documented_draw():
    images = np.arange(10)[:, None, None] * np.ones((10, 2, 2))
    pairs = datasets.eval_pairs(images, 4, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    i, j = rng.integers(0, 10, 4), rng.integers(0, 10, 4)
    np.testing.assert_array_equal(pairs["moving"][:, 0, 0], i)
    np.testing.assert_array_equal(pairs["fixed"][:, 0, 0], j)


def test_shared_mnist_archive_is_grouped_by_digit():
    data = datasets.load_mnist(shared_data("mnist", "mnist.npz"))
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    # As the manifest warns: the training labels come in sorted runs.
    assert np.all(np.diff(data.y_train.astype(int)) >= 0)
    assert jnp.asarray(data.y_test[:20]).tolist() != sorted(data.y_test[:20].tolist())
