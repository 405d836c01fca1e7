"""Fuzzing ``jaxreg.io.load`` with mutated NIfTI files.

Valid small ``.nii`` and ``.nii.gz`` files written by ``jaxreg.io.save`` are damaged with
seeded random mutations: bit flips and byte overwrites (mostly in the header), truncation
at random points, NIfTI header fields set to hostile values (zero, negative, huge, NaN,
Inf; dims, datatype, bitpix, vox_offset, scaling, pixdim, sform...), and inserted or
deleted bytes. For ``.nii.gz`` the damage is done either to the NIfTI bytes before
compression (so the header fields are really corrupted) or to the compressed stream.

Every load must end in one of two ways: an :class:`~jaxreg.grid.Image` whose data have
the shape and dtype an image should have, or :class:`jaxreg.io.FileReadError` (of which
``ImageReadError`` is one) naming the file. Never another exception type, never a hang;
and where NaN or Inf voxels (or a broken matrix) come through, ``io.check_image`` — the
check the command runs — refuses them.
"""

from __future__ import annotations

import collections
import gzip
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxreg import io
from jaxreg.grid import Image

from helpers import time_limit

CASES = 400  # per format
HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4-byte extension flag


# Header fields and their (dtype, byte offset) in a NIfTI-1 header.
FIELDS = {name: nib.Nifti1Header.template_dtype.fields[name][:2] for name in nib.Nifti1Header.template_dtype.names}


def hostile_values(dtype: np.dtype, rng) -> np.ndarray:
    """A value for a field of ``dtype``: the edge cases a careless reader trips over."""
    base = dtype.base
    if base.kind in "iu":
        info = np.iinfo(base)
        choices = [0, 1, info.max, info.min, -1 if base.kind == "i" else info.max, int(rng.integers(info.min, info.max, endpoint=True))]
    elif base.kind == "f":
        choices = [0.0, -1.0, np.nan, np.inf, -np.inf, 1e30, -1e-30, float(rng.standard_normal() * 1e3)]
    else:  # byte strings (magic, descrip, ...)
        return np.frombuffer(rng.bytes(dtype.itemsize), np.uint8)
    value = np.zeros(dtype.shape, base)
    flat = value.reshape(-1)
    # one entry (say dim[2]) or all of them (the whole dim array)
    if flat.size > 1 and rng.random() < 0.7:
        flat[rng.integers(flat.size)] = choices[rng.integers(len(choices))]
    else:
        flat[:] = choices[rng.integers(len(choices))]
    return value


def mutate(raw: bytes, rng) -> tuple[str, bytes]:
    """One seeded mutation of the uncompressed NIfTI bytes ``raw``: (kind, bytes)."""
    data = bytearray(raw)
    kind = ("flip", "overwrite", "truncate", "field", "field", "insert", "delete")[rng.integers(7)]
    if kind == "flip":
        for _ in range(rng.integers(1, 6)):
            at = rng.integers(HEADER_BYTES if rng.random() < 0.8 else len(data))
            data[at] ^= 1 << int(rng.integers(8))
    elif kind == "overwrite":
        for _ in range(rng.integers(1, 4)):
            at = rng.integers(HEADER_BYTES if rng.random() < 0.8 else len(data))
            data[at : at + 4] = rng.bytes(4)
    elif kind == "truncate":
        data = data[: rng.integers(len(data))]
    elif kind == "field":
        for _ in range(rng.integers(1, 3)):
            name = list(FIELDS)[rng.integers(len(FIELDS))]
            dtype, offset = FIELDS[name]
            data[offset : offset + dtype.itemsize] = hostile_values(dtype, rng).tobytes()
            kind = f"field:{name}"
    elif kind == "insert":
        at = rng.integers(len(data))
        data[at:at] = rng.bytes(int(rng.integers(1, 24)))
    else:
        at = rng.integers(len(data))
        del data[at : at + int(rng.integers(1, 24))]
    return kind, bytes(data)


def damage_gzip(blob: bytes, rng) -> tuple[str, bytes]:
    """A mutation of the compressed stream itself."""
    data = bytearray(blob)
    if rng.random() < 0.5:
        return "gz-truncate", bytes(data[: rng.integers(len(data))])
    for _ in range(rng.integers(1, 4)):
        data[rng.integers(len(data))] = rng.integers(256)
    return "gz-overwrite", bytes(data)


def check_outcome(path: Path, outcomes: collections.Counter, kind: str):
    start = time.perf_counter()
    with warnings.catch_warnings(), time_limit(10):
        warnings.simplefilter("ignore")
        try:
            image = io.load(path)
        except io.FileReadError as err:  # ImageReadError included
            assert err.path == str(path) and str(path) in str(err)
            outcomes["error"] += 1
        except Exception as err:  # noqa: BLE001 -- the point of the test
            pytest.fail(f"{kind}: {type(err).__name__} escaped io.load: {err}")
        else:
            assert isinstance(image, Image)
            data = np.asarray(image.data)
            assert data.dtype == np.float32 and data.size > 0
            assert image.ndim == 3 and data.ndim in (3, 4), data.shape
            assert np.asarray(image.affine).shape == (4, 4)
            try:
                io.check_image(image)
            except ValueError as err:  # NaN/Inf voxels, constant data, a broken matrix
                finite = np.isfinite(data).all() and np.isfinite(np.asarray(image.affine)).all()
                assert finite or "NaN or Inf" in str(err) or "voxel-to-world" in str(err), err
                outcomes["refused by check_image"] += 1
            else:
                assert np.isfinite(data).all()
                outcomes["image"] += 1
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_mutated_files_load_or_fail_with_a_read_error(tmp_path, ext):
    rng = np.random.default_rng(20240611 + len(ext))
    source = tmp_path / "source.nii"
    data = rng.standard_normal((6, 5, 4)).astype(np.float32)
    affine = np.array([[1.2, 0.1, 0, -30], [0, 0.9, 0.2, 12], [0, 0, 2.5, 7], [0, 0, 0, 1]], np.float32)
    io.save(Image(data, affine), source)
    raw = source.read_bytes()
    compressed = gzip.compress(raw)
    target = tmp_path / f"fuzz{ext}"
    outcomes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for _ in range(CASES):
        if ext == ".nii.gz" and rng.random() < 0.3:
            kind, blob = damage_gzip(compressed, rng)
        else:
            kind, blob = mutate(raw, rng)
            blob = gzip.compress(blob) if ext == ".nii.gz" else blob
        kinds[kind.split(":")[0]] += 1
        target.write_bytes(blob)
        check_outcome(target, outcomes, kind)
    assert time.perf_counter() - start < 20, outcomes
    # the fuzzing reached both ends: files that still load, and files that cannot
    assert outcomes["image"] > 20 and outcomes["error"] > 20, outcomes
    assert len(kinds) >= 6, kinds


def test_unmutated_files_load_exactly(tmp_path):
    data = np.random.default_rng(0).standard_normal((6, 5, 4)).astype(np.float32)
    for ext in (".nii", ".nii.gz"):
        path = io.save(data, tmp_path / f"clean{ext}")
        np.testing.assert_array_equal(io.load(path).data, data)
