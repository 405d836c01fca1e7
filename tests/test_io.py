"""jaxreg.io: formats round trip, MetaImage against hand-written files, failures are clean."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxreg import io
from jaxreg.grid import Image

from helpers import oblique_affine, time_limit
from tests.helpers import shared_data

FORMATS = [".nii", ".nii.gz", ".mgz", ".mha"]


def roundtrip(image, path, **load_kw):
    io.save(image, path, overwrite=True)
    ndim = image.ndim
    squeeze = ndim == 2 and not str(path).endswith(".mha")
    return io.load(path, squeeze=squeeze, **load_kw)


def affine_tolerance(ext):
    # NIfTI keeps the float32 matrix in the sform exactly; MGH stores spacing, unit
    # directions and the centre, which recombine to within float32 rounding.
    return dict(rtol=0, atol=0) if ext.startswith(".nii") else dict(rtol=1e-5, atol=1e-4)


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# -- LPS / RAS --------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_lps_ras_flips_first_two_world_axes_and_is_an_involution(ndim):
    affine = oblique_affine(ndim)
    ras = io.lps_to_ras_affine(affine)
    np.testing.assert_array_equal(ras[:2], -affine[:2])
    np.testing.assert_array_equal(ras[2:], affine[2:])
    np.testing.assert_array_equal(io.ras_to_lps_affine(ras), affine)
    assert ras.dtype == affine.dtype
    np.testing.assert_array_equal(np.asarray(io.lps_to_ras_affine(jnp.asarray(affine))), ras)


def test_lps_ras_rejects_non_square_or_1d():
    with pytest.raises(ValueError):
        io.lps_to_ras_affine(np.eye(2))
    with pytest.raises(ValueError):
        io.lps_to_ras_affine(np.eye(4)[:3])


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_roundtrip_oblique_anisotropic(tmp_path, ext, ndim):
    shape = (5, 4, 3)[:ndim]
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    affine = oblique_affine(ndim, seed=ndim)
    first = roundtrip(Image(data, affine), tmp_path / f"a{ext}")
    assert first.data.dtype == np.float32 and first.data.shape == shape
    assert isinstance(first.data, np.ndarray)
    np.testing.assert_array_equal(first.data, data)
    np.testing.assert_allclose(first.affine, affine, **affine_tolerance(ext))
    # After one trip through the file the matrix is a fixed point, for every format.
    second = roundtrip(first, tmp_path / f"b{ext}")
    np.testing.assert_array_equal(second.data, first.data)
    np.testing.assert_array_equal(second.affine, first.affine)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_affine_equals_nibabel(tmp_path, ext):
    affine = oblique_affine(3, seed=5)
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine.astype(np.float64)), tmp_path / f"a{ext}")
    image = io.load(tmp_path / f"a{ext}")
    np.testing.assert_array_equal(image.affine, nib.load(tmp_path / f"a{ext}").affine.astype(np.float32))
    assert image.affine.dtype == np.float32


def test_qform_only_nifti_is_a_fixed_point_after_one_trip(tmp_path):
    img = nib.Nifti1Image(np.ones((3, 4, 5), np.float32), None)
    rotation = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.diag([1.1, 0.7, 2.3])
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = [1.25, -3.5, 7.0]
    img.set_qform(affine, code=1)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "q.nii")
    first = io.load(tmp_path / "q.nii")
    np.testing.assert_allclose(first.affine, affine, atol=1e-6)
    io.save(first, tmp_path / "r.nii")
    np.testing.assert_array_equal(io.load(tmp_path / "r.nii").affine, first.affine)


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_roundtrip_channels_last(tmp_path, ext, ndim):
    shape = (4, 3, 2)[:ndim] + (3,)
    data = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    image = roundtrip(Image(data, oblique_affine(ndim)), tmp_path / f"c{ext}")
    assert image.has_channels and image.ndim == ndim
    np.testing.assert_array_equal(image.data, data)


def test_nifti_channels_are_written_as_itk_vectors(tmp_path):
    io.save(Image(np.zeros((2, 3, 4, 3), np.float32), np.eye(4)), tmp_path / "v.nii")
    img = nib.load(tmp_path / "v.nii")
    assert img.shape == (2, 3, 4, 1, 3)
    assert img.header.get_intent()[0] == "vector"


def test_nibabel_4d_and_5d_vector_layouts(tmp_path):
    data4 = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data4, np.eye(4)), tmp_path / "t.nii")
    np.testing.assert_array_equal(io.load(tmp_path / "t.nii").data, data4)
    data5 = np.random.default_rng(1).standard_normal((2, 3, 4, 1, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data5, np.eye(4)), tmp_path / "f.nii.gz")
    field = io.load(tmp_path / "f.nii.gz")
    assert field.shape == (2, 3, 4, 3) and field.ndim == 3
    np.testing.assert_array_equal(field.data, data5[:, :, :, 0])
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 2, 3), np.float32), np.eye(4)), tmp_path / "bad.nii")
    with pytest.raises(io.ImageReadError, match="bad.nii"):
        io.load(tmp_path / "bad.nii")


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize(
    "dtype, high, stored",
    [(np.int32, 35, np.uint8), (np.int64, 1000, np.int16), (np.int32, 70000, np.int32), (np.uint8, 255, np.uint8)],
)
def test_labels_stay_integers(tmp_path, ext, dtype, high, stored):
    labels = np.random.default_rng(3).integers(0, high + 1, (6, 5, 4)).astype(dtype)
    labels.flat[0] = high
    path = tmp_path / f"seg{ext}"
    io.save(Image(labels, oblique_affine(3)), path)
    back = io.load(path, dtype=dtype)
    assert back.data.dtype == dtype
    np.testing.assert_array_equal(back.data, labels)
    assert io.load(path).data.dtype == np.float32  # intensities by default
    if ext != ".mha":
        assert nib.load(path).get_data_dtype().newbyteorder("=") == stored  # MGH is big-endian


def test_bool_saved_as_uint8_and_loaded_as_bool(tmp_path):
    mask = np.random.default_rng(0).random((4, 5, 6)) > 0.5
    io.save(mask, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(io.load(tmp_path / "m.nii.gz", dtype=bool).data, mask)


def test_integer_dtype_refuses_fractional_or_out_of_range_values(tmp_path):
    io.save(np.array([[[0.5, 1.0]]], np.float32), tmp_path / "f.nii")
    with pytest.raises(ValueError, match="whole numbers"):
        io.load(tmp_path / "f.nii", dtype=np.int32)
    io.save(np.array([[[0, 300]]], np.int32), tmp_path / "i.nii")
    with pytest.raises(ValueError, match="do not fit"):
        io.load(tmp_path / "i.nii", dtype=np.uint8)


def test_save_refuses_unwritable_data(tmp_path):
    with pytest.raises(ValueError, match="int32"):
        io.save(np.array([[[0, 2**40]]], np.int64), tmp_path / "big.nii")
    with pytest.raises(ValueError, match="invertible"):
        io.save(Image(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0])), tmp_path / "s.nii")
    with pytest.raises(ValueError, match="MetaImage"):
        io.save(np.zeros((2, 2, 2, 2)), tmp_path / "4d.mha")
    assert listing(tmp_path) == []


def test_plain_array_gets_identity_affine(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    io.save(jnp.asarray(data), tmp_path / "p.nii")
    image = io.load(tmp_path / "p.nii")
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_array_equal(image.affine, np.eye(4))


# -- squeeze ----------------------------------------------------------------------------


def test_squeeze_slice_file(tmp_path):
    # The layout of the OASIS slices: index axis 2 (singleton) runs along world y.
    affine = np.array([[-1.0, 0, 0, 80], [0, 0, 1.5, -0.5], [0, -2, 0, 96], [0, 0, 0, 1]])
    data = np.random.default_rng(0).standard_normal((6, 7, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "slice.nii.gz")
    assert io.load(tmp_path / "slice.nii.gz").shape == (6, 7, 1)
    image = io.load(tmp_path / "slice.nii.gz", squeeze=True)
    assert image.shape == (6, 7) and image.ndim == 2
    np.testing.assert_array_equal(image.data, data[..., 0])
    np.testing.assert_array_equal(image.affine, [[-1, 0, 80], [0, -2, 96], [0, 0, 1]])
    # World points of the slice agree with the 3-D ones on the kept axes (x and z).
    full = io.load(tmp_path / "slice.nii.gz")
    np.testing.assert_allclose(np.asarray(image.grid.points()), np.asarray(full.grid.points())[:, :, 0][..., [0, 2]])


def test_squeeze_keeps_channels_and_leaves_full_images_alone():
    image = Image(np.zeros((3, 1, 4, 2)), oblique_affine(3))
    squeezed = io.squeeze(image)
    assert squeezed.shape == (3, 4, 2) and squeezed.ndim == 2
    full = Image(np.zeros((3, 4, 5)), oblique_affine(3))
    assert io.squeeze(full) is full
    point = Image(np.zeros((1, 1, 1)), oblique_affine(3))
    assert io.squeeze(point) is point


def test_two_d_nifti_is_written_as_a_slice(tmp_path):
    affine = oblique_affine(2)
    io.save(Image(np.ones((4, 5), np.float32), affine), tmp_path / "s.nii")
    img = nib.load(tmp_path / "s.nii")
    assert img.shape == (4, 5, 1)
    expected = np.eye(4)
    expected[:2, :2] = affine[:2, :2]
    expected[:2, 3] = affine[:2, 2]
    np.testing.assert_array_equal(img.affine, expected)


# -- MetaImage against hand-written files ----------------------------------------------


def write_mhd(folder, header, raw, *, raw_name="img.raw"):
    (folder / raw_name).write_bytes(raw)
    lines = [f"{k} = {v}" for k, v in header.items()] + [f"ElementDataFile = {raw_name}"]
    (folder / "img.mhd").write_text("\n".join(lines) + "\n")
    return folder / "img.mhd"


def test_metaimage_header_and_raw_with_known_lps_geometry(tmp_path):
    values = np.arange(24, dtype=np.int16)
    header = {
        "ObjectType": "Image",
        "NDims": 3,
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        # index axis 0 runs along LPS +y, axis 1 along +z, axis 2 along +x
        "TransformMatrix": "0 1 0 0 0 1 1 0 0",
        "Offset": "10 20 30",
        "ElementSpacing": "0.5 2 3",
        "DimSize": "3 4 2",
        "ElementType": "MET_SHORT",
    }
    image = io.load(write_mhd(tmp_path, header, values.tobytes()))
    assert image.shape == (3, 4, 2) and image.data.dtype == np.float32
    x, y, z = np.meshgrid(np.arange(3), np.arange(4), np.arange(2), indexing="ij")
    np.testing.assert_array_equal(image.data, x + 3 * y + 12 * z)  # x fastest in the file
    expected = np.array([[0, 0, -3, -10], [-0.5, 0, 0, -20], [0, 2, 0, 30], [0, 0, 0, 1]], np.float32)
    np.testing.assert_array_equal(image.affine, expected)
    # voxel (1, 2, 1): LPS (10 + 3, 20 + 0.5, 30 + 4) is RAS (-13, -20.5, 34)
    point = image.grid.index_to_world(jnp.array([1.0, 2.0, 1.0]))
    np.testing.assert_allclose(np.asarray(point), [-13, -20.5, 34])


@pytest.mark.parametrize(
    "met, dtype",
    [("MET_UCHAR", "u1"), ("MET_CHAR", "i1"), ("MET_USHORT", "u2"), ("MET_SHORT", "i2"), ("MET_INT", "i4"),
     ("MET_UINT", "u4"), ("MET_FLOAT", "f4"), ("MET_DOUBLE", "f8")],
)
@pytest.mark.parametrize("msb", [False, True])
def test_metaimage_element_types_and_byte_order(tmp_path, met, dtype, msb):
    values = np.arange(12).reshape(3, 4).astype(dtype)  # (y, x) in C order
    raw = values.astype(np.dtype(dtype).newbyteorder(">" if msb else "<")).tobytes()
    header = {"NDims": 2, "DimSize": "4 3", "ElementType": met, "BinaryDataByteOrderMSB": str(msb),
              "Position": "1 2", "Orientation": "1 0 0 1"}
    image = io.load(write_mhd(tmp_path, header, raw), dtype=dtype)
    assert image.data.dtype == np.dtype(dtype) and image.data.dtype.isnative
    np.testing.assert_array_equal(image.data, values.T)
    np.testing.assert_array_equal(image.affine, [[-1, 0, -1], [0, -1, -2], [0, 0, 1]])


def test_metaimage_channels_and_header_size(tmp_path):
    values = np.arange(2 * 3 * 2, dtype=np.float32).reshape(3, 2, 2)  # (y, x, C)
    header = {"NDims": 2, "DimSize": "2 3", "ElementType": "MET_FLOAT", "ElementNumberOfChannels": 2,
              "HeaderSize": 7}
    image = io.load(write_mhd(tmp_path, header, b"garbage" + values.tobytes()))
    assert image.shape == (2, 3, 2) and image.has_channels
    np.testing.assert_array_equal(image.data, values.transpose(1, 0, 2))
    header["HeaderSize"] = -1
    np.testing.assert_array_equal(io.load(write_mhd(tmp_path, header, b"xyz" + values.tobytes())).data, image.data)


@pytest.mark.parametrize("local", [True, False])
def test_compressed_metaimage(tmp_path, local):
    values = np.random.default_rng(0).integers(-1000, 1000, (4, 5, 6)).astype(np.int16)  # (z, y, x)
    packed = zlib.compress(values.tobytes())
    header = (
        "ObjectType = Image\nNDims = 3\nCompressedData = True\n"
        f"CompressedDataSize = {len(packed)}\nDimSize = 6 5 4\nElementSpacing = 1 1 2\nElementType = MET_SHORT\n"
    )
    if local:
        path = tmp_path / "c.mha"
        path.write_bytes((header + "ElementDataFile = LOCAL\n").encode() + packed)
    else:
        (tmp_path / "c.zraw").write_bytes(packed)
        path = tmp_path / "c.mhd"
        path.write_text(header + "ElementDataFile = c.zraw\n")
    image = io.load(path, dtype=np.int16)
    np.testing.assert_array_equal(image.data, values.transpose(2, 1, 0))
    np.testing.assert_array_equal(image.affine, np.diag([-1, -1, 2, 1]))


def test_metaimage_writer_header_is_plain_metaio(tmp_path):
    affine = np.diag([-0.5, -2.0, 3.0, 1.0]).astype(np.float32)
    affine[:3, 3] = [-10, -20, 30]
    io.save(Image(np.zeros((3, 4, 2), np.int16), affine), tmp_path / "w.mha")
    header = (tmp_path / "w.mha").read_bytes().split(b"ElementDataFile = LOCAL\n")[0].decode()
    fields = dict(line.split(" = ") for line in header.splitlines())
    assert fields["DimSize"] == "3 4 2"
    assert fields["ElementType"] == "MET_UCHAR"  # all zeros: the narrowest integer type
    assert [float(v) for v in fields["Offset"].split()] == [10, 20, 30]
    assert [float(v) for v in fields["ElementSpacing"].split()] == [0.5, 2, 3]
    assert [float(v) for v in fields["TransformMatrix"].split()] == [1, 0, 0, 0, 1, 0, 0, 0, 1]


# -- failures ---------------------------------------------------------------------------


def small_nifti(tmp_path, name="s.nii"):
    data = np.random.default_rng(0).standard_normal((3, 4, 2)).astype(np.float32)
    path = tmp_path / name
    io.save(Image(data, oblique_affine(3)), path)
    return path


@pytest.mark.parametrize("name", ["t.nii.gz", "t.nii", "t.mgz", "t.mha"])
def test_truncated_file_raises_image_read_error(tmp_path, name):
    full = tmp_path / f"full_{name}"
    io.save(np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32), full)
    blob = full.read_bytes()
    (tmp_path / name).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(io.ImageReadError, match=name) as info:
        io.load(tmp_path / name)
    assert info.value.path == str(tmp_path / name)


def test_not_gzip_and_empty_files(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"this is not gzip")
    with pytest.raises(io.ImageReadError, match="x.nii.gz"):
        io.load(tmp_path / "x.nii.gz")
    (tmp_path / "e.mha").write_bytes(b"")
    with pytest.raises(io.ImageReadError, match="e.mha"):
        io.load(tmp_path / "e.mha")


def test_missing_files_and_unknown_extensions(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii"):
        io.load(tmp_path / "nope.nii")
    with pytest.raises(ValueError, match=r"img\.png.*extension"):
        io.load(tmp_path / "img.png")
    with pytest.raises(ValueError, match="extension"):
        io.save(np.zeros((2, 2)), tmp_path / "img.mhd")
    write_mhd(tmp_path, {"NDims": 2, "DimSize": "1 1", "ElementType": "MET_UCHAR"}, b"\0")
    os.remove(tmp_path / "img.raw")
    with pytest.raises(io.ImageReadError, match="img.raw"):
        io.load(tmp_path / "img.mhd")


def test_overwrite_refusal(tmp_path):
    path = small_nifti(tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="s.nii"):
        io.save(np.zeros((2, 2, 2)), path)
    assert path.read_bytes() == before
    io.save(np.zeros((2, 2, 2)), path, overwrite=True)
    assert io.load(path).shape == (2, 2, 2)
    assert listing(tmp_path) == ["s.nii"]


@pytest.mark.parametrize("writer, ext", [("_write_nifti", ".nii.gz"), ("_write_mgh", ".mgz"), ("_write_metaimage", ".mha")])
@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path, monkeypatch, writer, ext, existing):
    path = tmp_path / f"out{ext}"
    if existing:
        path.write_bytes(b"old contents")

    def half_written(data, affine, target):
        Path(target).write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io, writer, half_written)
    with pytest.raises(RuntimeError, match="disk on fire"):
        io.save(np.zeros((2, 3, 4), np.float32), path, overwrite=existing)
    if existing:
        assert listing(tmp_path) == [path.name] and path.read_bytes() == b"old contents"
    else:
        assert listing(tmp_path) == []


def test_saved_file_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = small_nifti(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_protect_refuses_inputs_under_any_spelling(tmp_path, monkeypatch):
    source = small_nifti(tmp_path, "in.nii")
    monkeypatch.chdir(tmp_path)
    for target in [source, Path("in.nii"), tmp_path / "sub" / ".." / "in.nii"]:
        with pytest.raises(ValueError, match="input"):
            io.save(np.zeros((2, 2, 2)), target, overwrite=True, protect=[source])
    os.symlink(source, tmp_path / "link.nii")
    with pytest.raises(ValueError, match="input"):
        io.save(np.zeros((2, 2, 2)), tmp_path / "link.nii", overwrite=True, protect=(str(source),))
    io.save(np.zeros((2, 2, 2)), tmp_path / "other.nii", protect=[source])
    assert io.load(source).shape == (3, 4, 2)


def test_check_image():
    good = Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), oblique_affine(3))
    assert io.check_image(good, name="fixed") is good
    io.check_image(np.arange(4))
    bad = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match="moving is constant"):
        io.check_image(bad, name="moving")
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        io.check_image(Image(bad), name="moving")
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        io.check_image(bad)
    with pytest.raises(ValueError, match="empty"):
        io.check_image(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="singular"):
        io.check_image(Image(np.arange(4.0).reshape(2, 2), np.diag([1.0, 0.0, 1.0])))


def test_load_keeps_nan_for_check_image_to_find(tmp_path):
    data = np.ones((2, 3, 4), np.float32)
    data[0, 0, 0] = np.nan
    io.save(data, tmp_path / "nan.nii")
    image = io.load(tmp_path / "nan.nii")
    assert np.isnan(image.data[0, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        io.check_image(image)


# -- properties -------------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.uint8, np.int16, np.int32, np.int64, np.bool_]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ndim=st.sampled_from([2, 3]),
    sizes=st.lists(st.integers(2, 5), min_size=3, max_size=3),
    channels=st.sampled_from([0, 2, 3]),
    dtype=st.sampled_from(DTYPES),
    ext=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(ndim, sizes, channels, dtype, ext, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(sizes[:ndim]) + ((channels,) if channels else ())
    if np.issubdtype(dtype, np.floating):
        data = (rng.standard_normal(shape) * 100).astype(dtype)
    elif dtype == np.bool_:
        data = rng.random(shape) > 0.5
    else:
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -30000), min(info.max, 70000), shape, endpoint=True).astype(dtype)
    affine = oblique_affine(ndim, seed)
    with tempfile.TemporaryDirectory() as folder:
        back = roundtrip(Image(data, affine), Path(folder) / f"p{ext}", dtype=dtype)
        assert listing(folder) == [f"p{ext}"]
    assert back.data.dtype == dtype and back.shape == shape and back.ndim == ndim
    expected = data.astype(np.float32).astype(dtype) if np.issubdtype(dtype, np.floating) else data
    np.testing.assert_array_equal(back.data, expected)
    np.testing.assert_allclose(back.affine, affine, **affine_tolerance(ext))


def fuzz(path, cases, seed):
    """Load ``cases`` byte-mutated or truncated copies of ``path``: only clean outcomes."""
    blob = path.read_bytes()
    rng = np.random.default_rng(seed)
    outcomes = {"image": 0, "error": 0}
    target = path.with_name("fuzz" + "".join(path.suffixes))
    for case in range(cases):
        mutated = bytearray(blob)
        if case % 10 == 0:
            mutated = mutated[: rng.integers(0, len(blob))]
        else:
            # Most of the structure is in the header: aim most mutations there.
            span = len(blob) if rng.random() < 0.3 else min(len(blob), 400)
            for _ in range(rng.integers(1, 5)):
                mutated[rng.integers(0, span)] = rng.integers(0, 256)
        target.write_bytes(bytes(mutated))
        with warnings.catch_warnings(), time_limit(10):
            warnings.simplefilter("ignore")
            try:
                image = io.load(target)
            except (io.ImageReadError, ValueError):
                outcomes["error"] += 1
            else:
                assert isinstance(image, Image)
                outcomes["image"] += 1
    return outcomes


@pytest.mark.parametrize("ext", [".nii", ".mha"])
def test_fuzzed_files_fail_cleanly(tmp_path, ext):
    source = tmp_path / f"source{ext}"
    io.save(Image(np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32), oblique_affine(3)), source)
    start = time.perf_counter()
    outcomes = fuzz(source, cases=250, seed=7)
    assert outcomes["image"] > 0 and outcomes["error"] > 0, outcomes
    assert time.perf_counter() - start < 60


# -- shared data ------------------------------------------------------------------------


def test_shared_oasis_volume_and_labels():
    folder = shared_data("oasis", "OASIS_OAS1_0001_MR1")
    shared_data("oasis", "OASIS_OAS1_0001_MR1", "aligned_seg35.nii.gz")
    norm = io.load(folder / "aligned_norm.nii.gz")
    assert norm.shape == (160, 192, 224) and norm.data.dtype == np.float32
    np.testing.assert_array_equal(norm.affine, nib.load(folder / "aligned_norm.nii.gz").affine)
    io.check_image(norm, name="aligned_norm")
    seg = io.load(folder / "aligned_seg35.nii.gz", dtype=np.int32)
    assert seg.shape == (160, 192, 224) and seg.data.dtype == np.int32
    assert set(np.unique(seg.data)) == set(range(36))


def test_shared_oasis_slice_squeezes_to_2d():
    # Each file asked for by name: a partial copy of the data (the 3-D pair alone, as a GPU
    # machine gets it) skips the test rather than failing it.
    image = io.load(shared_data("oasis", "OASIS_OAS1_0001_MR1", "slice_norm.nii.gz"), squeeze=True)
    assert image.shape == (160, 192) and image.affine.shape == (3, 3)
    labels = io.load(shared_data("oasis", "OASIS_OAS1_0001_MR1", "slice_seg24.nii.gz"), squeeze=True, dtype=np.int16)
    assert labels.shape == (160, 192) and labels.data.dtype == np.int16
    np.testing.assert_array_equal(labels.affine, image.affine)


def test_shared_headct_metaimage(tmp_path):
    path = shared_data("headct", "CT_2D_head_fixed.mha")
    image = io.load(path)
    assert image.shape == (256, 256) and image.data.dtype == np.float32
    assert image.affine.shape == (3, 3)
    np.testing.assert_array_equal(image.affine, np.diag([-1, -1, 1]))  # identity LPS
    raw = io.load(path, dtype=np.int16)
    np.testing.assert_array_equal(raw.data, image.data)
    # The same pixels as a C-order read of the file, with x (the fastest axis) first.
    blob = path.read_bytes()
    pixels = np.frombuffer(blob[-256 * 256 * 2 :], "<i2").reshape(256, 256)
    np.testing.assert_array_equal(raw.data, pixels.T)
    io.save(raw, tmp_path / "ct.mha")
    np.testing.assert_array_equal(io.load(tmp_path / "ct.mha", dtype=np.int16).data, raw.data)
    mask = io.load(shared_data("headct", "CT_2D_head_fixed_mask.mha"), dtype=np.uint8)
    assert set(np.unique(mask.data)) <= {0, 1}
