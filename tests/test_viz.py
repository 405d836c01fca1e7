"""jaxreg.viz: the pictures hold the numbers they claim to (overlay channels, checkerboard,
deformed grid lines, Jacobian values) and the report is written atomically as a real PNG."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402

from jaxreg import viz  # noqa: E402
from jaxreg.grid import Grid, Image, apply_affine  # noqa: E402
from jaxreg.transforms import Affine, Displacement, warp  # noqa: E402


def smooth_image(shape, seed=0):
    """A non-constant image with some structure (sums of cosines)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    image = sum(np.cos((2 + rng.uniform(0, 3)) * np.pi * a + rng.uniform(0, 6)) for a in axes)
    return image.astype(np.float32)


def grid_affine(ndim, spacing=1.5, origin=-10.0):
    affine = np.eye(ndim + 1, dtype=np.float32)
    affine[:ndim, :ndim] *= spacing
    affine[:ndim, ndim] = origin
    return affine


# ------------------------------------------------------------------------------ pure parts


def test_normalize_maps_percentiles_to_unit_interval():
    x = np.arange(101, dtype=np.float32)
    np.testing.assert_allclose(viz.normalize(x, (0, 100)), x / 100.0)
    clipped = viz.normalize(x, (10, 90))
    assert clipped[0] == 0.0 and clipped[-1] == 1.0
    np.testing.assert_allclose(clipped[50], 0.5)
    assert np.all(viz.normalize(np.full(5, 3.0)) == 0.0)  # constant: zeros, no NaN
    assert viz.normalize(np.array([0.0, np.nan, 1.0]), (0, 100)).tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("shape, tiles", [((16, 12), 4), ((8, 6, 4), 2), ((12, 8), (3, 2))])
def test_checkerboard_matches_a_numpy_construction(shape, tiles):
    a = np.random.default_rng(0).standard_normal(shape)
    b = np.random.default_rng(1).standard_normal(shape)
    counts = np.broadcast_to(tiles, (len(shape),))
    # Tiles of equal size here, so the board is a Kronecker product of a parity pattern.
    parity = np.indices(tuple(counts)).sum(axis=0) % 2
    block = np.ones([n // t for n, t in zip(shape, counts)])
    expected = np.where(np.kron(parity, block) == 0, a, b)
    np.testing.assert_array_equal(viz.checkerboard(a, b, tiles=tiles), expected)


def test_checkerboard_uneven_tiles_and_errors():
    a, b = np.zeros((10, 7)), np.ones((10, 7))
    board = viz.checkerboard(a, b, tiles=3)
    rows, cols = np.arange(10) * 3 // 10, np.arange(7) * 3 // 7
    np.testing.assert_array_equal(board, (rows[:, None] + cols[None, :]) % 2)
    with pytest.raises(ValueError, match="same shape"):
        viz.checkerboard(a, np.ones((10, 6)))
    with pytest.raises(ValueError, match="positive"):
        viz.checkerboard(a, b, tiles=0)


def test_view_axis_follows_the_world_axes():
    assert viz.view_axis(Grid((5, 6))) is None
    identity = Grid((5, 6, 7))
    assert [viz.view_axis(identity, v) for v in ("axial", "coronal", "sagittal")] == [2, 1, 0]
    # index axis 0 runs along S, axis 1 along R (negated: L), axis 2 along A
    affine = np.zeros((4, 4), np.float32)
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.0, -1.0, 1.5, 1.0
    permuted = Grid((5, 6, 7), affine)
    assert [viz.view_axis(permuted, v) for v in ("axial", "coronal", "sagittal")] == [0, 2, 1]
    assert viz.view_axis(permuted, 1) == 1
    with pytest.raises(ValueError, match="view"):
        viz.view_axis(identity, "oblique")


def test_deformed_grid_lines_of_an_affine_are_the_affine_applied_to_the_lines():
    grid = Grid((20, 16), grid_affine(2))
    matrix = np.array([[1.1, 0.2, 3.0], [-0.1, 0.9, -2.0], [0, 0, 1]], np.float32)
    transform = Affine(matrix)
    spacing = 4
    lines = viz.deformed_grid_lines(transform, grid, spacing=spacing, samples_per_voxel=2, space="world")
    straight = viz.deformed_grid_lines(Affine.identity(2), grid, spacing=spacing, samples_per_voxel=2)
    # The undeformed lines, built independently: along axis 0 at every 4th row of axis 1, then the other way.
    t0, t1 = np.linspace(0, 19, 39), np.linspace(0, 15, 31)
    expected_index = [np.stack([t0, np.full_like(t0, p)], -1) for p in range(0, 16, spacing)]
    expected_index += [np.stack([np.full_like(t1, p), t1], -1) for p in range(0, 20, spacing)]
    assert len(straight) == len(expected_index) == len(lines)
    for got, want in zip(straight, expected_index):
        np.testing.assert_allclose(got, want, atol=1e-4)
    for got, index in zip(lines, expected_index):
        world = apply_affine(np.asarray(grid.affine, np.float64), index)
        np.testing.assert_allclose(got, apply_affine(matrix.astype(np.float64), world), atol=1e-3)
    # In index space (what the figure draws): the same points through the grid's inverse.
    in_index = viz.deformed_grid_lines(transform, grid, spacing=spacing, samples_per_voxel=2)
    inverse = np.linalg.inv(np.asarray(grid.affine, np.float64))
    for got, world_mapped in zip(in_index, lines):
        np.testing.assert_allclose(got, apply_affine(inverse, world_mapped), atol=1e-3)
    fig = viz.deformed_grid(transform, grid, spacing=spacing)
    segments = fig.axes[0].collections[-1].get_segments()
    assert len(segments) == len(in_index)
    for got, want in zip(segments, viz.deformed_grid_lines(transform, grid, spacing=spacing)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_deformed_grid_lines_in_a_3d_slice():
    grid = Grid((10, 12, 8), grid_affine(3, spacing=2.0))
    matrix = np.eye(4, dtype=np.float32)
    matrix[:3, :3] = [[1.0, 0.1, 0.0], [0.0, 1.2, 0.0], [0.0, 0.3, 1.0]]
    matrix[:3, 3] = [1.0, -2.0, 0.5]
    lines = viz.deformed_grid_lines(Affine(matrix), grid, spacing=3, view="axial", samples_per_voxel=1)
    # axial fixes index axis 2 at its middle; the first lines run along axis 0
    t = np.arange(10.0)
    index = np.stack([t, np.zeros_like(t), np.full_like(t, 4.0)], -1)
    world = apply_affine(np.asarray(grid.affine, np.float64), index)
    mapped_index = apply_affine(np.linalg.inv(np.asarray(grid.affine, np.float64)), apply_affine(matrix.astype(np.float64), world))
    np.testing.assert_allclose(lines[0], mapped_index[:, :2], atol=1e-4)
    assert len(lines) == len(range(0, 12, 3)) + len(range(0, 10, 3))


# ----------------------------------------------------------------------------- figures


def test_overlay_channels_are_the_normalised_inputs():
    fixed, moving = smooth_image((24, 20), 0), smooth_image((24, 20), 1)
    fig = viz.overlay(fixed, moving)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.shape == (20, 24, 3)  # rows are the second axis (drawn vertically)
    np.testing.assert_allclose(shown[..., 0], viz.normalize(fixed).T, atol=1e-6)
    np.testing.assert_allclose(shown[..., 1], viz.normalize(moving).T, atol=1e-6)
    np.testing.assert_allclose(shown[..., 2], shown[..., 0])  # magenta = red + blue
    rgb = viz.overlay_rgb(fixed, moving, colors="red-green")
    assert np.all(rgb[..., 2] == 0)
    with pytest.raises(ValueError, match="same shape"):
        viz.overlay_rgb(fixed, moving[:-1])


def test_overlay_of_3d_images_shows_the_middle_axial_slice_normalised_over_the_volume():
    fixed, moving = smooth_image((10, 12, 9), 2), smooth_image((10, 12, 9), 3)
    fig = viz.overlay(Image(fixed, grid_affine(3)), Image(moving, grid_affine(3)), view="axial")
    shown = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(shown[..., 0], viz.normalize(fixed)[:, :, 4].T, atol=1e-6)
    np.testing.assert_allclose(shown[..., 1], viz.normalize(moving)[:, :, 4].T, atol=1e-6)


def test_overlay_resamples_a_moving_image_on_another_grid_through_world_space():
    fixed = Image(smooth_image((16, 14), 0), grid_affine(2))
    shifted = grid_affine(2)
    shifted[:2, 2] += 3.0  # the moving image sits 3 mm further along both axes
    moving = Image(smooth_image((16, 14), 1), shifted)
    fig = viz.overlay(fixed, moving)
    expected = warp(moving, Affine.identity(2), fixed.grid).data
    shown = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(shown[..., 1], viz.normalize(expected).T, atol=1e-5)


@pytest.mark.parametrize("log", [False, True])
def test_jacobian_map_of_a_scaling_is_the_analytic_determinant(log):
    grid = Grid((14, 12), grid_affine(2))
    scaling = Affine(np.diag([1.5, 0.8, 1.0]).astype(np.float32))
    fig = viz.jacobian_map(scaling, grid, log=log)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    expected = np.log(1.2) if log else 1.2
    np.testing.assert_allclose(shown, expected, rtol=1e-5)
    assert len(fig.axes[0].images) == 1  # no folds layer
    assert "folds 0%" in fig.axes[0].get_title()
    norm = fig.axes[0].images[0].norm  # diverging map centred at 1 (log: 0)
    np.testing.assert_allclose((norm.vmin + norm.vmax) / 2, 0.0 if log else 1.0, atol=1e-6)


def test_jacobian_map_in_3d_and_folds_are_highlighted():
    grid = Grid((8, 9, 10), grid_affine(3))
    scaling = Affine(np.diag([1.2, 0.9, 1.1, 1.0]).astype(np.float32))
    fig = viz.jacobian_map(scaling, grid, view="coronal")
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), 1.2 * 0.9 * 1.1, rtol=1e-5)
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == (10, 8)  # coronal: axes 0 and 2
    mirror = Affine(np.diag([-1.0, 1.0, 1.0, 1.0]).astype(np.float32))
    fig = viz.jacobian_map(mirror, grid)
    assert len(fig.axes[0].images) == 2
    folds = np.asarray(fig.axes[0].images[1].get_array())
    assert np.all(folds[..., 3] == 1.0)  # every voxel is folded
    assert "folds 100%" in fig.axes[0].get_title()


@pytest.mark.parametrize("ndim", [2, 3])
def test_report_writes_a_png_of_the_expected_size(tmp_path, ndim):
    shape = (24, 20) if ndim == 2 else (12, 14, 10)
    affine = grid_affine(ndim)
    fixed = Image(smooth_image(shape, 0), affine)
    moving = Image(smooth_image(shape, 1), affine)
    field = 0.8 * np.stack([smooth_image(shape, 4 + k) for k in range(ndim)], -1)
    transform = Displacement(field, affine)  # cheaper to compile than a Velocity
    warped = jax.jit(warp)(moving, transform, fixed.grid)
    path = tmp_path / "report.png"
    fig = viz.report(fixed, moving, warped, transform, path, dpi=50)
    rows = 1 if ndim == 2 else 3
    assert len(fig.axes) >= 5 * rows
    picture = mpimg.imread(path)
    assert picture.shape[:2] == (round(3.2 * rows * 50), round(3.2 * 5 * 50))
    assert picture[..., :3].std() > 0.1  # not blank
    assert len(np.unique(picture[..., :3].reshape(-1, 3), axis=0)) > 100
    assert os.listdir(tmp_path) == ["report.png"]  # no temporary file left
    # The determinant shown in the last column is the transform's.
    from jaxreg.transforms import jacobian_determinant

    det = np.asarray(jax.jit(jacobian_determinant)(transform, fixed.grid))
    plane = det if ndim == 2 else det[:, :, shape[2] // 2]
    np.testing.assert_allclose(np.asarray(fig.axes[4].images[0].get_array()), plane.T, rtol=1e-4, atol=1e-5)


def test_save_figure_is_atomic_and_refuses_to_overwrite(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = tmp_path / "plot.png"
    viz.save_figure(fig, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        viz.save_figure(fig, path)
    assert path.read_bytes() == before
    viz.save_figure(fig, path, overwrite=True)
    assert mpimg.imread(path).shape[:2] == (200, 200)
    with pytest.raises(ValueError):
        viz.save_figure(fig, tmp_path / "plot.unknownformat")
    assert sorted(os.listdir(tmp_path)) == ["plot.png"]
