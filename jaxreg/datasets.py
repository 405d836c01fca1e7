"""Datasets for training registration networks: MNIST from its standard files, pair samplers.

- :func:`read_idx` / :func:`load_mnist` read the MNIST distribution as LeCun published it
  (``train-images-idx3-ubyte[.gz]`` and friends: the IDX format, a big-endian header of
  dimensions then raw bytes) or a ``.npz`` with ``x_train, y_train, x_test, y_test``;
- :func:`pair_sampler` returns a pure ``sample(key) -> batch`` that draws random
  (moving, fixed) pairs from images held on the device, for :func:`jaxreg.nn.training.train`;
- :func:`eval_pairs` draws a fixed, seeded set of pairs for evaluation.

>>> import numpy as np, jax
>>> sample = pair_sampler(np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2), batch_size=3)
>>> batch = sample(jax.random.key(0))
>>> batch["moving"].shape, batch["fixed"].shape
((3, 2, 2), (3, 2, 2))
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import io

__all__ = ["DatasetReadError", "MNIST", "read_idx", "load_mnist", "pair_sampler", "eval_pairs"]

# IDX type codes (the third header byte) and the numpy types they stand for.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DatasetReadError(io.FileReadError):
    """A dataset file exists but is not what it should be (bad header, truncated, wrong keys)."""

    what = "dataset file"


class MNIST(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path) -> np.ndarray:
    """One IDX file (optionally gzipped) as a numpy array of the dtype and shape its header gives."""
    path = Path(path)
    io._check_file(path, what="IDX")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DatasetReadError(path, f"corrupt gzip stream ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetReadError(path, "not an IDX file (its first bytes are not 0, 0, a type code, a rank)")
    rank = raw[3]
    header = 4 + 4 * rank
    if rank == 0 or len(raw) < header:
        raise DatasetReadError(path, f"IDX header of rank {rank} is truncated")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=rank, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetReadError(path, f"header says shape {shape} ({expected} bytes of data) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(2, f"no MNIST file {stem}[.gz] in the folder", str(folder))


def load_mnist(path) -> MNIST:
    """MNIST from a folder of the four standard IDX files or from an ``.npz`` archive.

    Images are ``uint8`` ``(n, 28, 28)``, labels ``uint8`` ``(n,)``, as distributed. Note that
    some archives group the training images by digit: shuffle with a seed before taking
    subsets.
    """
    path = Path(path)
    if path.is_dir():
        arrays = {key: read_idx(_find_idx(path, stem)) for key, stem in _MNIST_FILES.items()}
    else:
        io._check_file(path, what="MNIST")
        try:
            with np.load(path) as archive:
                arrays = {key: np.asarray(archive[key]) for key in _MNIST_FILES}
        except KeyError as error:
            raise DatasetReadError(path, f"archive lacks {error}; it needs {sorted(_MNIST_FILES)}") from None
        except (ValueError, OSError) as error:
            raise DatasetReadError(path, f"not an .npz archive ({error})") from None
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DatasetReadError(path, f"{split} images {images.shape} and labels {labels.shape} do not match")
    return MNIST(**arrays)


def _as_image_stack(images, name: str):
    images = jnp.asarray(images)
    if images.ndim < 2 or images.shape[0] < 1:
        raise ValueError(f"{name} must be a stack of images (n, *spatial) with n >= 1; got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point (scale uint8 images to 0..1 first); got dtype {images.dtype}")
    return images


def pair_sampler(images, *, batch_size: int, fixed_images=None, labels=None):
    """``sample(key) -> {"moving": (b, ...), "fixed": (b, ...)}``: random pairs, with replacement.

    Moving and fixed images are drawn independently from ``images`` (or the fixed ones
    from ``fixed_images``); with ``labels`` (one label map per image) the batch also holds
    ``"moving_labels"`` and ``"fixed_labels"``. Pure and jit-able: the images live on the
    device and the draw is a gather.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    moving_pool = _as_image_stack(images, "images")
    fixed_pool = moving_pool if fixed_images is None else _as_image_stack(fixed_images, "fixed_images")
    label_pool = None if labels is None else jnp.asarray(labels)
    if label_pool is not None and (fixed_images is not None or label_pool.shape[:1] != moving_pool.shape[:1]):
        raise ValueError(f"labels need one map per image and no separate fixed_images; got labels {label_pool.shape} for images {moving_pool.shape}")
    size = int(batch_size)

    def sample(key):
        key_moving, key_fixed = jax.random.split(key)
        i = jax.random.randint(key_moving, (size,), 0, moving_pool.shape[0])
        j = jax.random.randint(key_fixed, (size,), 0, fixed_pool.shape[0])
        batch = {"moving": moving_pool[i], "fixed": fixed_pool[j]}
        if label_pool is not None:
            batch["moving_labels"] = label_pool[i]
            batch["fixed_labels"] = label_pool[j]
        return batch

    return sample


def eval_pairs(images, count: int, rng: np.random.Generator) -> dict:
    """``count`` (moving, fixed) pairs drawn with ``rng`` (numpy), reproducible across tools."""
    images = np.asarray(images)
    i = rng.integers(0, len(images), count)
    j = rng.integers(0, len(images), count)
    return {"moving": images[i], "fixed": images[j]}
