"""jaxreg.itk: ITK/ANTs transform files round trip, hand-written files parse to hand-computed
maps, ANTs applies what jaxreg writes (and jaxreg applies what ANTs writes) as jaxreg does."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from jaxreg import io, itk
from jaxreg.grid import Grid, Image
from jaxreg.transforms import Affine, Displacement, Velocity, compose, invert, warp

from helpers import oblique_affine

# Measured agreement of ANTs' and jaxreg's linear interpolation at interior voxels: about
# 1e-6 to 2e-6 on images whose values span ~2 (float32 coordinates); the bound keeps a
# 50x margin. A wrong order, sign or centre gives errors of 0.1 to 1.
INTEROP_ATOL = 1e-4


def rotation(rotvec):
    """Rodrigues' formula (3-D) -- scipy is not needed for a rotation."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    angle = np.linalg.norm(rotvec)
    if angle == 0:
        return np.eye(3)
    k = rotvec / angle
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def rotation_2d(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def grid_affine(spacing, origin, rot):
    """Rotated (not sheared: ITK reads the NIfTI qform), anisotropic, translated."""
    ndim = len(spacing)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = (rotation(rot) if ndim == 3 else rotation_2d(rot)) @ np.diag(spacing)
    affine[:ndim, ndim] = origin
    return affine.astype(np.float32)


def random_affine(ndim, seed=0):
    rng = np.random.default_rng(seed)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] += 0.2 * rng.standard_normal((ndim, ndim))
    matrix[:ndim, ndim] = rng.uniform(-20, 20, ndim)
    return Affine(matrix)


def smooth_field(grid, amplitude=2.0):
    """A smooth analytic displacement (mm) on ``grid``."""
    p = np.asarray(grid.points())
    if grid.ndim == 3:
        u = [np.sin(p[..., 1] / 5), 0.8 * np.cos(p[..., 2] / 6), 0.6 * np.sin(p[..., 0] / 4)]
    else:
        u = [np.sin(p[..., 1] / 5), 0.75 * np.cos(p[..., 0] / 4)]
    return (amplitude * np.stack(u, axis=-1)).astype(np.float32)


def smooth_image(grid):
    p = np.asarray(grid.points(), dtype=np.float64)
    c = p.reshape(-1, grid.ndim).mean(axis=0)
    scale = np.array([7.0, 5.0, 6.0][: grid.ndim])
    blob = np.exp(-np.sum(((p - c) / scale) ** 2, axis=-1))
    waves = 0.5 * np.sin(p[..., 0] / 3) * np.cos(p[..., 1] / 4)
    return (blob + waves).astype(np.float32)


def ras(point):
    """An LPS point written in a hand-made file, in jaxreg's RAS."""
    return io.lps_to_ras_vectors(np.asarray(point, dtype=np.float64))


def write_text(path, text):
    Path(path).write_text(text)
    return path


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# -- io helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_lps_flip_of_world_maps_and_vectors(ndim):
    flip = np.diag([-1.0, -1.0] + [1.0] * (ndim - 1))
    matrix = np.asarray(random_affine(ndim).matrix, dtype=np.float64)
    np.testing.assert_allclose(io.lps_to_ras_transform(matrix), flip @ matrix @ flip, atol=1e-12)
    np.testing.assert_array_equal(io.ras_to_lps_transform(io.lps_to_ras_transform(matrix)), matrix)
    np.testing.assert_allclose(np.asarray(io.lps_to_ras_transform(jnp.asarray(matrix))), flip @ matrix @ flip, atol=1e-6)
    vectors = np.arange(4.0 * ndim).reshape(4, ndim)
    np.testing.assert_array_equal(io.lps_to_ras_vectors(vectors), vectors @ flip[:ndim, :ndim])
    # The flipped map takes flipped points to flipped points.
    point = np.array([1.5, -2.0, 3.0][:ndim])
    mapped = io.lps_to_ras_transform(matrix) @ np.append(io.lps_to_ras_vectors(point), 1.0)
    np.testing.assert_allclose(mapped[:ndim], io.lps_to_ras_vectors((matrix @ np.append(point, 1.0))[:ndim]))


def test_write_bytes_is_atomic_and_overwrite_protected(tmp_path):
    path = tmp_path / "a.bin"
    io.write_bytes(path, b"one")
    with pytest.raises(FileExistsError):
        io.write_bytes(path, b"two")
    assert path.read_bytes() == b"one"
    io.write_bytes(path, b"three", overwrite=True)
    assert path.read_bytes() == b"three"
    assert listing(tmp_path) == ["a.bin"]  # no temporary files left


# -- affine files -----------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".txt", ".tfm", ".mat"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_round_trip(tmp_path, ext, ndim):
    affine = random_affine(ndim, seed=ndim)
    path = itk.write_affine(affine, tmp_path / f"a{ext}")
    back = itk.read_affine(path)
    np.testing.assert_allclose(np.asarray(back.matrix), np.asarray(affine.matrix), rtol=1e-6, atol=1e-6)
    # A centre changes the stored numbers, not the map.
    centred = itk.write_affine(affine, tmp_path / f"c{ext}", center=[10.0, -20.0, 5.0][:ndim])
    assert centred.read_bytes() != path.read_bytes()
    np.testing.assert_allclose(np.asarray(itk.read_affine(centred).matrix), np.asarray(affine.matrix), rtol=1e-5, atol=1e-5)
    assert listing(tmp_path) == sorted([f"a{ext}", f"c{ext}"])


def test_affine_write_refuses_to_overwrite_and_bad_input(tmp_path):
    path = itk.write_affine(Affine.identity(3), tmp_path / "a.mat")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        itk.write_affine(random_affine(3), path)
    assert path.read_bytes() == before
    itk.write_affine(random_affine(3), path, overwrite=True)
    assert path.read_bytes() != before
    with pytest.raises(ValueError, match="extension"):
        itk.write_affine(Affine.identity(3), tmp_path / "a.h5")
    with pytest.raises(ValueError, match="not finite"):
        itk.write_affine(Affine(np.full((4, 4), np.nan)), tmp_path / "nan.txt")
    with pytest.raises(TypeError):
        itk.write_affine(np.eye(4), tmp_path / "array.txt")


def test_mat_file_holds_lps_parameters_scipy_reads(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    linear = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 10.0]])
    affine = Affine.from_linear(linear, [10.0, 20.0, 30.0])
    path = itk.write_affine(affine, tmp_path / "a.mat")
    mat = scipy_io.loadmat(path)
    params = mat["AffineTransform_double_3_3"]
    assert params.shape == (12, 1) and params.dtype == np.float64
    # F A F with F = diag(-1, -1, 1): entries (i, j) change sign when one of i, j is z.
    expected = [1, 2, -3, 4, 5, -6, -7, -8, 10, -10, -20, 30]
    np.testing.assert_array_equal(params[:, 0], expected)
    np.testing.assert_array_equal(mat["fixed"], np.zeros((3, 1)))

    centred = itk.write_affine(Affine.from_linear(np.eye(2) * 2.0, [1.0, 0.0]), tmp_path / "c.mat", center=[3.0, 4.0])
    mat = scipy_io.loadmat(centred)
    # LPS: M = 2 I, c = (-3, -4), offset (-1, 0); t = offset - c + M c = (-1 + 3 - 6, 0 + 4 - 8).
    np.testing.assert_array_equal(mat["AffineTransform_double_2_2"][:, 0], [2, 0, 0, 2, -4, -4])
    np.testing.assert_array_equal(mat["fixed"][:, 0], [-3, -4])


def test_text_file_is_itk_format(tmp_path):
    affine = Affine.from_linear(np.diag([2.0, 3.0]), [1.0, -0.5])
    text = itk.write_affine(affine, tmp_path / "a.txt").read_text()
    assert text.splitlines() == [
        "#Insight Transform File V1.0",
        "#Transform 0",
        "Transform: AffineTransform_double_2_2",
        "Parameters: 2.0 0.0 0.0 3.0 -1.0 0.5",
        "FixedParameters: 0.0 0.0",
    ]


def test_matrix_offset_with_centre_maps_a_point_as_computed_by_hand(tmp_path):
    path = write_text(
        tmp_path / "m.txt",
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: MatrixOffsetTransformBase_double_3_3\n"
        "Parameters: 0 -1 0 1 0 0 0 0 2 1 2 3\n"
        "FixedParameters: 10 20 30\n",
    )
    t = itk.read_affine(path)
    # LPS (11, 22, 33): x - c = (1, 2, 3), M (x - c) = (-2, 1, 6), + c + t = (9, 23, 39).
    np.testing.assert_allclose(np.asarray(t(jnp.asarray(ras([11.0, 22.0, 33.0]), jnp.float32))), ras([9.0, 23.0, 39.0]), atol=1e-5)


def test_float_affine_2d_with_centre_and_windows_line_ends(tmp_path):
    path = write_text(
        tmp_path / "f.tfm",
        "#Insight Transform File V1.0\r\n#Transform 0\r\nTransform: AffineTransform_float_2_2\r\n"
        "Parameters: 2 0 0 3 1 1\r\nFixedParameters: 1 1\r\n",
    )
    # LPS (2, 3): x - c = (1, 2) -> (2, 6) -> + c + t = (4, 8).
    np.testing.assert_allclose(np.asarray(itk.read_affine(path)(jnp.asarray(ras([2.0, 3.0]), jnp.float32))), ras([4.0, 8.0]), atol=1e-6)


@pytest.mark.parametrize(
    "name, params, fixed, point, expected",
    [
        # 90 degrees about z, centre (1, 0, 0): (2, 0, 0) -> c + Rz (1, 0, 0) = (1, 1, 0).
        ("Euler3DTransform_double_3_3", "0 0 1.5707963267948966 0 0 0", "1 0 0 0", [2, 0, 0], [1, 1, 0]),
        # ITK's default order: about y, then x (then z): (1,0,0) -> (0,0,-1) -> (0,1,0).
        ("Euler3DTransform_double_3_3", "1.5707963267948966 1.5707963267948966 0 0 0 0", "0 0 0 0", [1, 0, 0], [0, 1, 0]),
        # ComputeZYX: about x, then y: (1,0,0) -> (1,0,0) -> (0,0,-1).
        ("Euler3DTransform_double_3_3", "1.5707963267948966 1.5707963267948966 0 0 0 0", "0 0 0 1", [1, 0, 0], [0, 0, -1]),
        # Versor of 90 degrees about z, translation (1, 2, 3).
        ("VersorRigid3DTransform_double_3_3", f"0 0 {math.sqrt(0.5)} 1 2 3", "0 0 0", [1, 0, 0], [1, 3, 3]),
        # Same rotation, scale 2.
        ("Similarity3DTransform_double_3_3", f"0 0 {math.sqrt(0.5)} 0 0 0 2", "0 0 0", [1, 0, 0], [0, 2, 0]),
        ("QuaternionRigidTransform_double_3_3", f"0 0 {math.sqrt(0.5)} {math.sqrt(0.5)} 0 0 0", "0 0 0", [1, 0, 0], [0, 1, 0]),
        ("TranslationTransform_double_3_3", "1 2 3", "", [1, 1, 1], [2, 3, 4]),
        ("ScaleTransform_double_3_3", "2 3 4", "1 1 1", [2, 2, 2], [3, 4, 5]),
        ("IdentityTransform_double_3_3", "", "", [1, 2, 3], [1, 2, 3]),
        # 2-D: 90 degrees counter-clockwise about (1, 1), then (1, 0).
        ("Euler2DTransform_double_2_2", "1.5707963267948966 1 0", "1 1", [2, 1], [2, 2]),
        ("Rigid2DTransform_float_2_2", "1.5707963267948966 1 0", "1 1", [2, 1], [2, 2]),
        ("Similarity2DTransform_double_2_2", "2 1.5707963267948966 0 0", "0 0", [1, 0], [0, 2]),
        ("CenteredAffineTransform_double_2_2", "0 -1 1 0 1 1 1 0", "", [2, 1], [2, 2]),
    ],
)
def test_itk_transform_types_map_points_as_computed_by_hand(tmp_path, name, params, fixed, point, expected):
    lines = ["#Insight Transform File V1.0", "#Transform 0", f"Transform: {name}", f"Parameters: {params}"]
    if fixed:
        lines.append(f"FixedParameters: {fixed}")
    t = itk.read_affine(write_text(tmp_path / "t.txt", "\n".join(lines) + "\n"))
    got = np.asarray(t(jnp.asarray(ras(point), jnp.float32)))
    np.testing.assert_allclose(got, ras(expected), atol=1e-6)


def test_composite_text_file_applies_its_last_transform_first(tmp_path):
    path = write_text(
        tmp_path / "c.txt",
        "#Insight Transform File V1.0\n#Transform 0\nTransform: CompositeTransform_double_3_3\n"
        "#Transform 1\nTransform: TranslationTransform_double_3_3\nParameters: 1 0 0\nFixedParameters: \n"
        "#Transform 2\nTransform: ScaleTransform_double_3_3\nParameters: 2 2 2\nFixedParameters: 0 0 0\n",
    )
    # Scale first, then translate: (1, 1, 1) -> (2, 2, 2) -> (3, 2, 2).
    np.testing.assert_allclose(np.asarray(itk.read_affine(path)(jnp.asarray(ras([1, 1, 1]), jnp.float32))), ras([3, 2, 2]), atol=1e-6)


def write_mat_v4(path, variables, *, order="<", precision=0):
    dtype = np.dtype("f8" if precision == 0 else "f4").newbyteorder(order)
    payload = b""
    for name, values in variables:
        values = np.asarray(values, dtype=dtype).ravel()
        kind = (1000 if order == ">" else 0) + 10 * precision
        payload += struct.pack(order + "5i", kind, values.size, 1, 0, len(name) + 1) + name.encode() + b"\0" + values.tobytes()
    Path(path).write_bytes(payload)
    return path


@pytest.mark.parametrize("order, precision", [("<", 0), ("<", 1), (">", 0), (">", 1)])
def test_mat_v4_of_any_byte_order_and_precision(tmp_path, order, precision):
    # 2-D, M = [[0, -1], [1, 0]], t = (1, 0), c = (1, 1): (2, 1) -> (2, 2), as above.
    path = write_mat_v4(tmp_path / "a.mat", [("AffineTransform_float_2_2", [0, -1, 1, 0, 1, 0]), ("fixed", [1, 1])], order=order, precision=precision)
    np.testing.assert_allclose(np.asarray(itk.read_affine(path)(jnp.asarray(ras([2, 1]), jnp.float32))), ras([2, 2]), atol=1e-6)


# -- errors -----------------------------------------------------------------------------


def test_missing_garbage_and_unsupported_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        itk.read_affine(tmp_path / "missing.mat")
    assert "missing.mat" in str(err.value)
    with pytest.raises(FileNotFoundError):
        itk.read_transforms([tmp_path / "missing.nii.gz"])

    cases = {
        "garbage.txt": (b"hello world\nthis is not a transform\n", "not 'Key: value'"),
        "binary.txt": (bytes(range(256)), "binary"),
        "empty.txt": (b"", "no 'Transform:' line"),
        "garbage.mat": (b"\xff" * 64, "not a MATLAB v4"),
        "truncated.mat": (itk._mat_variable("AffineTransform_double_3_3", np.zeros(12))[:60], "truncated"),
        "bspline.txt": (
            b"#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\nParameters: 0 0 0\nFixedParameters: 0\n",
            "not a linear transform",
        ),
        "strange.txt": (b"Transform: WarpyTransform_double_3_3\nParameters: 1 2\n", "unsupported transform type 'WarpyTransform_double_3_3'"),
        "count.txt": (b"Transform: AffineTransform_double_3_3\nParameters: 1 0 0 1\nFixedParameters: 0 0 0\n", "has 4 parameters, expected 12"),
        "words.txt": (b"Transform: AffineTransform_double_2_2\nParameters: 1 0 zero 1 0 0\n", "not numbers"),
        "list.txt": (b"Transform: TranslationTransform_double_2_2\nParameters: 1 0\nTransform: TranslationTransform_double_2_2\nParameters: 1 0\n", "no CompositeTransform"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(itk.TransformReadError, match=message) as err:
            itk.read_affine(path)
        assert os.fspath(path) in str(err.value)
        assert isinstance(err.value, ValueError)

    scipy_io = pytest.importorskip("scipy.io")
    v5 = tmp_path / "v5.mat"
    scipy_io.savemat(v5, {"AffineTransform_double_3_3": np.zeros((12, 1))})
    with pytest.raises(itk.TransformReadError, match="v5") as err:
        itk.read_affine(v5)
    assert "v5.mat" in str(err.value)


def test_field_errors_name_the_file(tmp_path):
    scalar = io.save(Image(np.ones((4, 5, 6), np.float32)), tmp_path / "scalar.nii.gz")
    with pytest.raises(itk.TransformReadError, match="not a displacement field") as err:
        itk.read_displacement_field(scalar)
    assert "scalar.nii.gz" in str(err.value)
    wrong = io.save(Image(np.ones((4, 5, 6, 4), np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(itk.TransformReadError, match="not a displacement field"):
        itk.read_displacement_field(wrong)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not gzip at all" * 20)
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        itk.read_transforms([garbage])
    with pytest.raises(ValueError, match="extension"):
        itk.read_displacement_field(tmp_path / "field.h5")
    with pytest.raises(ValueError, match="2 flags for 1 files"):
        itk.read_transforms([scalar], invert=[True, False])


# -- displacement fields ----------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".mha"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_round_trip_on_oblique_grid(tmp_path, ndim, ext):
    grid = Grid((9, 7, 6)[:ndim], oblique_affine(ndim, seed=ndim))
    transform = compose(random_affine(ndim, seed=5), Displacement(smooth_field(grid), grid.affine))
    path = itk.write_displacement_field(transform, grid, tmp_path / f"field{ext}")
    back = itk.read_displacement_field(path)
    assert back.ndim == ndim and back.field.shape == grid.shape + (ndim,)
    np.testing.assert_allclose(np.asarray(back.affine), np.asarray(grid.affine), rtol=1e-6, atol=1e-4)
    points = grid.points()
    expected = np.asarray(transform(points))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(back(points)), expected, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(np.asarray(back.field), expected - np.asarray(points), rtol=0, atol=2e-6 * scale)
    with pytest.raises(FileExistsError):
        itk.write_displacement_field(transform, grid, path)
    assert listing(tmp_path) == [f"field{ext}"]


def test_displacement_field_is_one_kept_program_and_refuses_tracers(tmp_path):
    import jax

    from jaxreg import _programs

    grid = Grid((9, 7), oblique_affine(2, seed=2))
    transform = Displacement(smooth_field(grid), grid.affine)
    _programs.clear()
    itk.write_displacement_field(transform, grid, tmp_path / "a.nii.gz")
    itk.write_displacement_field(Displacement(2 * transform.field, grid.affine), grid, tmp_path / "b.nii.gz")
    assert len(_programs._programs) == 1  # the second field ran the first's program
    np.testing.assert_allclose(np.asarray(itk.read_displacement_field(tmp_path / "b.nii.gz").field),
                               2 * np.asarray(itk.read_displacement_field(tmp_path / "a.nii.gz").field), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="concrete arrays"):
        jax.jit(lambda f: itk.write_displacement_field(Displacement(f, grid.affine), grid, tmp_path / "c.nii.gz"))(transform.field)
    assert listing(tmp_path) == ["a.nii.gz", "b.nii.gz"]


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_file_layout_is_itk_vectors_in_lps(tmp_path, ndim):
    grid = Grid.from_spacing((5, 4, 3)[:ndim], spacing=[1.5, 2.0, 2.5][:ndim], origin=[-3.0, 4.0, 1.0][:ndim])
    shift = np.array([1.0, 2.0, 3.0][:ndim])
    path = itk.write_displacement_field(Affine.from_linear(np.eye(ndim), shift), grid, tmp_path / "f.nii.gz")
    img = nib.load(path)
    expected_shape = (5, 4, 3, 1, 3) if ndim == 3 else (5, 4, 1, 1, 2)
    assert img.shape == expected_shape
    assert img.header.get_intent()[0] == "vector" and int(img.header["intent_code"]) == 1007
    assert img.get_data_dtype() == np.float32
    assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
    np.testing.assert_allclose(img.affine[:ndim, :ndim], np.asarray(grid.affine)[:ndim, :ndim])
    data = np.asarray(img.dataobj)
    # A RAS shift (1, 2[, 3]) is (-1, -2[, 3]) in LPS, at every voxel.
    np.testing.assert_array_equal(data.reshape(-1, ndim), np.broadcast_to(io.ras_to_lps_vectors(shift), (data.size // ndim, ndim)))


# -- ANTs transform lists ---------------------------------------------------------------


def test_write_transforms_splits_affine_and_dense_parts(tmp_path):
    grid = Grid((10, 9, 8), grid_affine([1.2, 1.0, 1.5], [-5, -4, -6], [0.1, -0.05, 0.08]))
    affine = random_affine(3, seed=1)
    velocity = Velocity(smooth_field(grid, amplitude=1.0), grid.affine, steps=5)
    points = grid.points()

    files = itk.write_transforms(affine, grid, tmp_path / "a")
    assert [Path(f).name for f in files] == ["affine.mat"] and files.inverse == []
    np.testing.assert_allclose(np.asarray(itk.read_transforms(files)(points)), np.asarray(affine(points)), atol=1e-4)

    transform = compose(affine, velocity)
    files = itk.write_transforms(transform, grid, tmp_path / "b", prefix="reg_", inverse=True)
    assert [Path(f).name for f in files] == ["reg_warp.nii.gz", "reg_affine.mat"]
    assert [Path(f).name for f in files.inverse] == ["reg_affine.mat", "reg_inverse_warp.nii.gz"]
    assert files.whichtoinvert == [True, False]
    assert listing(tmp_path / "b") == ["reg_affine.mat", "reg_inverse_warp.nii.gz", "reg_warp.nii.gz"]
    back = itk.read_transforms(files)
    np.testing.assert_allclose(np.asarray(back(points)), np.asarray(transform.mapped_points(grid)), atol=1e-4)
    # The inverse files map as jaxreg's exact inverse exp(-v) does, and undo the forward
    # map to within the interpolation error of the composition (fields of 1 mm).
    inverse = itk.read_transforms(files.inverse, invert=files.whichtoinvert)
    moved = transform(points)
    np.testing.assert_allclose(np.asarray(inverse(moved)), np.asarray(invert(transform)(moved)), atol=1e-4)
    round_trip = np.asarray(inverse(back(points)))
    np.testing.assert_allclose(round_trip[2:-2, 2:-2, 2:-2], np.asarray(points)[2:-2, 2:-2, 2:-2], atol=2e-2)
    # An inverse given as a transform (moving -> fixed) is written as the same field.
    files_given = itk.write_transforms(transform, grid, tmp_path / "c", inverse=invert(transform))
    np.testing.assert_allclose(
        np.asarray(itk.read_displacement_field(files_given.inverse[1]).field),
        np.asarray(itk.read_displacement_field(files.inverse[1]).field),
        atol=1e-4,
    )

    files = itk.write_transforms(velocity, grid, tmp_path / "d")
    assert [Path(f).name for f in files] == ["warp.nii.gz"]
    np.testing.assert_allclose(np.asarray(itk.read_transforms(files[0])(points)), np.asarray(velocity.mapped_points(grid)), atol=1e-4)


def test_write_transforms_writes_nothing_when_a_file_exists(tmp_path):
    grid = Grid((6, 5, 4))
    transform = compose(random_affine(3), Displacement(smooth_field(grid), grid.affine))
    (tmp_path / "warp.nii.gz").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        itk.write_transforms(transform, grid, tmp_path)
    assert listing(tmp_path) == ["warp.nii.gz"] and (tmp_path / "warp.nii.gz").read_bytes() == b"precious"
    files = itk.write_transforms(transform, grid, tmp_path, overwrite=True)
    assert listing(tmp_path) == ["affine.mat", "warp.nii.gz"]
    np.testing.assert_allclose(np.asarray(itk.read_transforms(files)(grid.points())), np.asarray(transform(grid.points())), atol=1e-4)


# -- interop with ANTs ------------------------------------------------------------------


def inside(points, grid, margin):
    index = np.asarray(grid.world_to_index(points))
    return np.all((index >= margin) & (index <= np.array(grid.shape) - 1 - margin), axis=-1)


def interior(transform, fixed_grid, moving_grid, *, field=None):
    """Fixed voxels whose mapped point is over one voxel inside the moving image, where
    ANTs (edge value within half a voxel, then 0) and jaxreg (zero padding) agree; with
    ``field=(before, grid)``, also those whose point ``before(x)`` lies on the field's
    grid, beyond which ANTs' displacement is 0 and jaxreg's the edge value."""
    points = fixed_grid.points()
    mask = inside(transform(points), moving_grid, 1.01)
    if field is not None:
        before, grid = field
        mask &= inside(before(points), grid, 0.0)
    return mask


def to_ants(ants, data, affine):
    """An ANTs image with jaxreg's geometry, without going through a file (2-D)."""
    lps = io.ras_to_lps_affine(np.asarray(affine, np.float64))
    ndim = lps.shape[0] - 1
    spacing = np.sqrt(np.sum(lps[:ndim, :ndim] ** 2, axis=0))
    return ants.from_numpy(np.asarray(data, np.float32), origin=list(lps[:ndim, ndim]), spacing=list(spacing), direction=lps[:ndim, :ndim] / spacing)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Fixed and moving grids of different shape, spacing and orientation; a moving image;
    a known transform compose(affine, displacement) and the fixed image it produces."""
    ants = pytest.importorskip("ants")
    folder = tmp_path_factory.mktemp("ants")
    fixed_grid = Grid((24, 28, 20), grid_affine([1.2, 1.0, 1.5], [-14, -10, -12], [0.1, -0.05, 0.08]))
    moving_grid = Grid((26, 30, 22), grid_affine([1.1, 1.05, 1.3], [-13, -16, -11], [-0.05, 0.1, 0.02]))
    moving = Image(smooth_image(moving_grid), moving_grid.affine)
    centre = np.asarray(fixed_grid.points()).reshape(-1, 3).mean(axis=0)
    linear = 1.05 * rotation([0.05, 0.1, -0.2])
    affine = Affine.from_linear(linear, centre - linear @ centre + np.array([2.0, -3.0, 1.0]))
    transform = compose(affine, Displacement(smooth_field(fixed_grid, amplitude=2.5), fixed_grid.affine))
    fixed = warp(moving, transform, fixed_grid)
    io.save(moving, folder / "moving.nii.gz")
    io.save(Image(np.asarray(fixed.data), fixed_grid.affine), folder / "fixed.nii.gz")
    return dict(
        ants=ants,
        folder=folder,
        fixed_grid=fixed_grid,
        moving_grid=moving_grid,
        moving=moving,
        fixed=fixed,
        transform=transform,
        ants_fixed=ants.image_read(os.fspath(folder / "fixed.nii.gz")),
        ants_moving=ants.image_read(os.fspath(folder / "moving.nii.gz")),
    )


def test_ants_applies_jaxreg_files_as_jaxreg_does(scene):
    ants, transform = scene["ants"], scene["transform"]
    fixed_grid, moving_grid = scene["fixed_grid"], scene["moving_grid"]
    files = itk.write_transforms(transform, fixed_grid, scene["folder"] / "jaxreg", inverse=True)
    ours = np.asarray(warp(scene["moving"], transform, fixed_grid).data)
    theirs = ants.apply_transforms(scene["ants_fixed"], scene["ants_moving"], transformlist=files, interpolator="linear").numpy()
    mask = interior(transform, fixed_grid, moving_grid)
    assert mask.mean() > 0.4
    np.testing.assert_allclose(theirs[mask], ours[mask], rtol=0, atol=INTEROP_ATOL)
    # The order matters and is the one verified: the list reversed warps differently.
    swapped = ants.apply_transforms(scene["ants_fixed"], scene["ants_moving"], transformlist=list(reversed(files))).numpy()
    assert np.abs(swapped - ours)[mask].max() > 0.1

    # The inverse list warps the fixed image back onto the moving grid, as jaxreg's inverse does.
    back = ants.apply_transforms(scene["ants_moving"], scene["ants_fixed"], transformlist=files.inverse, whichtoinvert=files.whichtoinvert).numpy()
    inverse = invert(transform, grid=fixed_grid)
    ours_back = np.asarray(warp(scene["fixed"], inverse, moving_grid).data)
    mask = interior(inverse, moving_grid, fixed_grid, field=(inverse.transforms[-1], fixed_grid))
    assert mask.mean() > 0.4
    np.testing.assert_allclose(back[mask], ours_back[mask], rtol=0, atol=INTEROP_ATOL)


def test_ants_reads_jaxreg_affine_text_and_mha_field(scene):
    ants, transform = scene["ants"], scene["transform"]
    affine, dense = transform.transforms
    folder = scene["folder"]
    paths = [
        itk.write_displacement_field(dense, scene["fixed_grid"], folder / "field.mha"),
        itk.write_affine(affine, folder / "affine.txt", center=[3.0, -2.0, 1.0]),
    ]
    theirs = ants.apply_transforms(scene["ants_fixed"], scene["ants_moving"], transformlist=[os.fspath(p) for p in paths]).numpy()
    ours = np.asarray(warp(scene["moving"], transform, scene["fixed_grid"]).data)
    mask = interior(transform, scene["fixed_grid"], scene["moving_grid"])
    np.testing.assert_allclose(theirs[mask], ours[mask], rtol=0, atol=INTEROP_ATOL)
    # ANTs maps a point through the text affine as jaxreg does (LPS in, LPS out).
    tx = ants.read_transform(os.fspath(paths[1]))
    point = np.array([3.0, -4.0, 5.0])
    theirs = io.lps_to_ras_vectors(np.array(tx.apply_to_point(tuple(io.ras_to_lps_vectors(point)))))
    np.testing.assert_allclose(theirs, np.asarray(affine(jnp.asarray(point, jnp.float32))), atol=1e-4)


# ANTs is deterministic only with one ITK thread and a fixed seed. ITK reads its thread
# count once per process, so the registration runs in a process of its own; ants.registration
# ignores a random_seed keyword (the seed lives in ants.config).
ANTS_REGISTRATION_SCRIPT = """
import json, sys
import ants
ants.config._random_seed = 1
fixed, moving, kind, prefix = sys.argv[1:]
result = ants.registration(
    ants.image_read(fixed), ants.image_read(moving), type_of_transform=kind, outprefix=prefix,
    aff_iterations=(30, 10), aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0), reg_iterations=(20, 5),
)
print(json.dumps({key: result[key] for key in ("fwdtransforms", "invtransforms")}))
"""


def ants_registration(folder, kind):
    """Transform files of a reproducible ANTs registration of the scene's moving onto fixed."""
    environment = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
    arguments = [os.fspath(folder / "fixed.nii.gz"), os.fspath(folder / "moving.nii.gz"), kind, os.fspath(folder / f"ants{kind}_")]
    done = subprocess.run([sys.executable, "-c", ANTS_REGISTRATION_SCRIPT, *arguments], env=environment, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["Affine", "SyN"])
def test_jaxreg_applies_ants_registration_output_as_ants_does(scene, kind):
    ants = scene["ants"]
    fixed_grid, moving_grid = scene["fixed_grid"], scene["moving_grid"]
    result = ants_registration(scene["folder"], kind)
    forward = itk.read_transforms(result["fwdtransforms"])
    assert isinstance(forward, Affine) == (kind == "Affine")
    ours = np.asarray(warp(scene["moving"], forward, fixed_grid).data)
    theirs = ants.apply_transforms(scene["ants_fixed"], scene["ants_moving"], result["fwdtransforms"]).numpy()
    mask = interior(forward, fixed_grid, moving_grid)
    # Both tools must apply ANTs' result alike, over enough voxels to mean something.
    assert mask.sum() > 500
    np.testing.assert_allclose(theirs[mask], ours[mask], rtol=0, atol=INTEROP_ATOL)

    flags = [p.endswith(".mat") for p in result["invtransforms"]]
    backward = itk.read_transforms(result["invtransforms"], invert=flags)
    ours = np.asarray(warp(scene["fixed"], backward, moving_grid).data)
    theirs = ants.apply_transforms(scene["ants_moving"], scene["ants_fixed"], result["invtransforms"], whichtoinvert=flags).numpy()
    affine_inverse = backward if kind == "Affine" else backward.transforms[-1]
    mask = interior(backward, moving_grid, fixed_grid, field=(affine_inverse, fixed_grid))
    assert mask.sum() > 500
    np.testing.assert_allclose(theirs[mask], ours[mask], rtol=0, atol=INTEROP_ATOL)


def test_ants_2d_applies_jaxreg_files_as_jaxreg_does(tmp_path):
    ants = pytest.importorskip("ants")
    fixed_grid = Grid((30, 26), grid_affine([1.2, 0.9], [-15, -12], 0.2))
    moving_grid = Grid((28, 32), grid_affine([1.0, 1.1], [-12, -17], -0.1))
    moving = Image(smooth_image(moving_grid), moving_grid.affine)
    affine = Affine.from_params(np.array([0.15, 0.05, 2.0, -1.0]), kind="similarity", ndim=2)
    transform = compose(affine, Displacement(smooth_field(fixed_grid), fixed_grid.affine))
    files = itk.write_transforms(transform, fixed_grid, tmp_path)
    theirs = ants.apply_transforms(
        to_ants(ants, np.zeros(fixed_grid.shape), fixed_grid.affine), to_ants(ants, moving.data, moving.affine), transformlist=list(files)
    ).numpy()
    ours = np.asarray(warp(moving, transform, fixed_grid).data)
    mask = interior(transform, fixed_grid, moving_grid)
    assert mask.mean() > 0.4
    np.testing.assert_allclose(theirs[mask], ours[mask], rtol=0, atol=INTEROP_ATOL)


@pytest.mark.parametrize(
    "kind, ndim, params, fixed",
    [
        ("AffineTransform", 3, [1.1, 0.1, 0, 0, 0.9, 0.2, 0.05, 0, 1.0, 4, 5, 6], [1, 2, 3]),
        ("Euler3DTransform", 3, [0.1, 0.2, 0.3, 1, 2, 3], [1.5, -2.5, 0.5, 0]),
        ("Euler3DTransform", 3, [0.1, 0.2, 0.3, 1, 2, 3], [1.5, -2.5, 0.5, 1]),
        ("Similarity3DTransform", 3, [0.1, 0.2, 0.1, 1, 2, 3, 1.3], [1.5, -2.5, 0.5]),
        ("QuaternionRigidTransform", 3, [0.1, 0.2, 0.1, 0.97, 1, 2, 3], [1.5, -2.5, 0.5]),
        ("CenteredEuler3DTransform", 3, [0.1, 0.2, 0.3, 1, -1, 2, 1, 2, 3], [0, 0, 0, 0]),
        ("Euler2DTransform", 2, [0.3, 1, 2], [1.5, -2.5]),
        ("Similarity2DTransform", 2, [1.2, 0.3, 1, 2], [1.5, -2.5]),
        ("CenteredSimilarity2DTransform", 2, [1.2, 0.3, 1, -1, 1, 2], [0, 0]),
    ],
)
@pytest.mark.parametrize("ext", [".txt", ".mat"])
def test_linear_transforms_written_by_ants_map_points_as_ants_does(tmp_path, kind, ndim, params, fixed, ext):
    ants = pytest.importorskip("ants")
    tx = ants.create_ants_transform(transform_type=kind, dimension=ndim, precision="double")
    tx.set_parameters(params)
    tx.set_fixed_parameters(fixed)
    path = tmp_path / f"t{ext}"
    ants.write_transform(tx, os.fspath(path))
    ours = itk.read_affine(path)
    for point in ([3.0, 4.0, 5.0], [-10.0, 2.5, 0.0]):
        point = np.array(point[:ndim])
        theirs = io.lps_to_ras_vectors(np.array(tx.apply_to_point(tuple(io.ras_to_lps_vectors(point)))))
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(point, jnp.float32))), theirs, atol=2e-5)


def test_composite_written_by_ants_maps_points_as_ants_does(tmp_path):
    ants = pytest.importorskip("ants")
    a = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=np.array([[1.1, 0.1, 0], [0, 0.9, 0.2], [0.05, 0, 1.0]]), center=(1, 2, 3), translation=(4, 5, 6)
    )
    b = ants.create_ants_transform(transform_type="Euler3DTransform", dimension=3)
    b.set_parameters([0.1, 0.2, 0.3, 1, 2, 3])
    composite = ants.compose_ants_transforms([a, b])
    path = tmp_path / "composite.txt"
    ants.write_transform(composite, os.fspath(path))
    assert "CompositeTransform" in path.read_text()
    point = np.array([3.0, 4.0, 5.0])
    theirs = io.lps_to_ras_vectors(np.array(composite.apply_to_point(tuple(io.ras_to_lps_vectors(point)))))
    np.testing.assert_allclose(np.asarray(itk.read_affine(path)(jnp.asarray(point, jnp.float32))), theirs, atol=2e-5)
