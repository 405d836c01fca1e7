import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Grid, Image
from jaxreg.sampling import sample
from jaxreg.transforms import (
    AFFINE_KINDS,
    Affine,
    BSpline,
    Compose,
    Displacement,
    KernelTransform,
    Velocity,
    affine_param_count,
    compose,
    invert,
    jacobian_determinant,
    rotation_matrix,
    warp,
    wendland,
)
from tests.helpers import assert_finite_grad, assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop, smooth_field

GRIDS = {
    2: Grid.from_spacing((20, 17), spacing=(1.5, 1.0), origin=(-3.0, 4.0)),
    3: Grid.from_spacing((14, 12, 10), spacing=(1.0, 1.5, 2.0), origin=(1.0, -2.0, 0.5)),
}


def interior(x, margin=3):
    d = x.shape[-1] if x.ndim > 1 else x.ndim
    return x[(slice(margin, -margin),) * d]


# ---------------------------------------------------------------------------- affine


def test_param_counts():
    assert [affine_param_count(k, 2) for k in AFFINE_KINDS] == [2, 3, 4, 6]
    assert [affine_param_count(k, 3) for k in AFFINE_KINDS] == [3, 6, 7, 12]


def test_rotation_2d_is_counter_clockwise_and_3d_matches_scipy():
    np.testing.assert_allclose(rotation_matrix(jnp.array([np.pi / 2]), 2), [[0, -1], [1, 0]], atol=1e-6)
    vector = np.array([0.3, -0.7, 0.4])
    np.testing.assert_allclose(rotation_matrix(vector, 3), Rotation.from_rotvec(vector).as_matrix(), atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", AFFINE_KINDS)
def test_zero_params_are_identity_and_center_is_fixed(ndim, kind):
    n = affine_param_count(kind, ndim)
    np.testing.assert_allclose(Affine.from_params(jnp.zeros(n), kind=kind, ndim=ndim).matrix, np.eye(ndim + 1), atol=1e-7)
    params = jnp.asarray(np.random.default_rng(1).uniform(-0.3, 0.3, n), jnp.float32)
    params = params.at[-ndim:].set(0.0)  # no translation: the centre must not move
    center = jnp.arange(1.0, ndim + 1.0)
    t = Affine.from_params(params, kind=kind, ndim=ndim, center=center)
    np.testing.assert_allclose(t(center), center, atol=1e-5)


def test_similarity_scales_distances_and_rigid_keeps_them():
    points = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)
    d0 = jnp.linalg.norm(points[0] - points[1])
    rigid = Affine.from_params(jnp.array([0.2, -0.1, 0.3, 1.0, 2.0, 3.0]), kind="rigid", ndim=3)
    similarity = Affine.from_params(jnp.array([0.2, -0.1, 0.3, np.log(2.0), 1.0, 2.0, 3.0]), kind="similarity", ndim=3)
    moved = rigid(points)
    np.testing.assert_allclose(jnp.linalg.norm(moved[0] - moved[1]), d0, rtol=1e-5)
    moved = similarity(points)
    np.testing.assert_allclose(jnp.linalg.norm(moved[0] - moved[1]), 2 * d0, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_compose_invert_round_trip(ndim):
    rng = np.random.default_rng(ndim)
    a = Affine.from_params(rng.uniform(-0.2, 0.2, affine_param_count("affine", ndim)), kind="affine", ndim=ndim)
    b = Affine.from_params(rng.uniform(-0.2, 0.2, affine_param_count("rigid", ndim)), kind="rigid", ndim=ndim)
    points = jnp.asarray(rng.standard_normal((7, ndim)), jnp.float32)
    np.testing.assert_allclose(compose(a, b)(points), a(b(points)), atol=1e-5)
    assert isinstance(compose(a, b), Affine)  # affines merge into one matrix
    np.testing.assert_allclose(compose(invert(a), a)(points), points, atol=1e-5)
    np.testing.assert_allclose(invert(compose(a, b))(compose(a, b)(points)), points, atol=1e-5)


def test_affine_gradient_and_vmap():
    points = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32)
    target = points + jnp.array([1.0, -2.0, 0.5])
    loss = lambda p: jnp.sum((Affine.from_params(p, kind="similarity", ndim=3, center=jnp.ones(3))(points) - target) ** 2)
    assert_grad_matches_fd(loss, jnp.full(7, 0.05))
    params = jnp.asarray(np.random.default_rng(1).uniform(-0.2, 0.2, (4, 6)), jnp.float32)
    assert_vmap_matches_loop(lambda p: Affine.from_params(p, kind="rigid", ndim=3)(points), params)
    assert_jit_matches(lambda p: Affine.from_params(p, kind="affine", ndim=2).matrix, jnp.full(6, 0.1))


# ------------------------------------------------------------------- dense transforms


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_warp_is_a_no_op(ndim):
    grid = GRIDS[ndim]
    image = np.random.default_rng(0).standard_normal(grid.shape).astype(np.float32)
    moving = Image(image, grid.affine)
    for t in (Affine.identity(ndim), Displacement.zeros(grid), Velocity(jnp.zeros(grid.shape + (ndim,)), grid.affine), BSpline.zeros(grid, 4.0)):
        np.testing.assert_allclose(warp(moving, t).data, image, atol=1e-5, err_msg=type(t).__name__)


@pytest.mark.parametrize("ndim", [2, 3])
def test_integer_translation_warp_matches_numpy_shift(ndim):
    grid = GRIDS[ndim]
    image = np.random.default_rng(0).standard_normal(grid.shape).astype(np.float32)
    shift_voxels = np.array([2, -1, 1][:ndim])
    shift_mm = shift_voxels * np.asarray(grid.spacing)
    field = np.broadcast_to(shift_mm, grid.shape + (ndim,)).astype(np.float32)
    warped = warp(Image(image, grid.affine), Displacement(field, grid.affine)).data
    expected = ndi.shift(image, -shift_voxels, order=0, mode="constant", cval=0.0)
    np.testing.assert_allclose(warped, expected, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_between_grids_of_different_spacing_and_orientation(ndim):
    """A linear intensity ramp in world space, sampled on two different grids: warping
    one onto the other with the identity reproduces the other exactly (linear
    interpolation is exact on a linear function)."""
    rotation = rotation_matrix(jnp.full(ndim * (ndim - 1) // 2, 0.3), ndim)
    moving_affine = np.eye(ndim + 1, dtype=np.float32)
    moving_affine[:ndim, :ndim] = np.asarray(rotation) @ np.diag(np.linspace(0.8, 1.3, ndim))
    moving_affine[:ndim, ndim] = -8.0
    moving_grid = Grid((64,) * ndim, moving_affine)
    fixed_grid = Grid.from_spacing((10,) * ndim, spacing=1.7, origin=3.0)
    index = np.asarray(moving_grid.world_to_index(fixed_grid.points()))
    assert index.min() > 0 and (index.max(axis=tuple(range(ndim))) < np.array(moving_grid.shape) - 1).all()
    slope = jnp.arange(1.0, ndim + 1.0)
    ramp = lambda pts: pts @ slope + 5.0
    moving = Image(ramp(moving_grid.points()), moving_grid.affine)
    warped = warp(moving, Affine.identity(ndim), fixed_grid)
    assert warped.shape == fixed_grid.shape
    np.testing.assert_allclose(warped.affine, fixed_grid.affine)
    np.testing.assert_allclose(warped.data, ramp(fixed_grid.points()), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_fast_path_equals_interpolation(ndim):
    grid = GRIDS[ndim]
    t = Displacement(smooth_field(grid, 2.0), grid.affine)
    np.testing.assert_allclose(t.mapped_points(t.grid), t(grid.points()), atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_dense_invert_then_compose_is_identity(ndim):
    grid = GRIDS[ndim]
    t = Displacement(smooth_field(grid, 1.5, seed=ndim), grid.affine)
    inverse = invert(t, iterations=30)
    residual = compose(t, inverse).mapped_points(grid) - grid.points()
    assert float(jnp.abs(interior(residual)).max()) < 0.02


@pytest.mark.parametrize("ndim", [2, 3])
def test_svf_small_exp_is_identity_plus_v_and_exp_minus_v_inverts(ndim):
    grid = GRIDS[ndim]
    small = smooth_field(grid, 0.05)
    exp_small = Velocity(small, grid.affine).exp().field
    # exp(v) = id + v + O(|v| |grad v|): the error is second order in the amplitude.
    assert float(jnp.abs(exp_small - small).max()) < 0.05 * 0.05 * 4
    v = smooth_field(grid, 3.0, seed=1)
    forward = Velocity(v, grid.affine)
    residual = compose(forward, invert(forward)).mapped_points(grid) - grid.points()
    assert float(jnp.abs(interior(residual)).max()) < 0.05
    assert float(jnp.min(jacobian_determinant(forward, grid))) > 0


def test_svf_of_constant_field_is_translation():
    grid = GRIDS[3]
    v = np.broadcast_to(np.array([1.0, -0.5, 2.0], np.float32), grid.shape + (3,))
    np.testing.assert_allclose(Velocity(v, grid.affine).exp().field, v, atol=1e-5)


def test_bspline_partition_of_unity_and_single_bump():
    grid = Grid((21, 21), np.eye(3, dtype=np.float32))
    spline = BSpline.zeros(grid, 5.0)
    control = spline.grid
    assert control.shape == (7, 7)
    ones = BSpline(jnp.ones_like(spline.coefficients), control.affine)
    np.testing.assert_allclose(ones.mapped_points(grid) - grid.points(), 1.0, atol=1e-5)
    bump = BSpline(spline.coefficients.at[3, 3, 0].set(1.0), control.affine)
    points = control.index_to_world(jnp.array([[3.0, 3.0], [4.0, 3.0], [4.0, 4.0]]))
    # beta3 at 0 and 1 is 2/3 and 1/6; a tensor product in 2-D.
    np.testing.assert_allclose((bump(points) - points)[:, 0], [4 / 9, 1 / 9, 1 / 36], atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_bspline_on_parallel_grids_equals_the_per_point_spline(ndim):
    from jaxreg.registration import _shrunk
    from jaxreg.transforms import _axes_parallel
    from tests.helpers import oblique_affine

    shape = (23, 19, 15)[:ndim]
    image = Image(np.zeros(shape, np.float32), oblique_affine(ndim, seed=3))
    control = BSpline.control_grid(image.grid, 4.0 * max(image.grid.spacing))
    coefficients = np.random.default_rng(0).normal(0.0, 2.0, control.shape + (ndim,)).astype(np.float32)
    spline = BSpline(coefficients, control.affine)
    # The grid the control points were laid on and its pyramid levels (shifted by half a
    # voxel, a quarter of the control spacing per voxel): separable, and the same numbers.
    for grid in (image.grid, _shrunk(image, 2).grid, _shrunk(image, 3).grid):
        assert _axes_parallel(spline.affine, grid.affine)
        per_point = spline(grid.points())
        separable = spline.on_parallel_grid(grid)
        np.testing.assert_allclose(grid.points() + separable.field, per_point, atol=2e-4)
        np.testing.assert_allclose(spline.mapped_points(grid), per_point, atol=2e-4)
    # A rotated grid is not parallel: mapped_points takes the per-point path.
    turned = Grid(shape, oblique_affine(ndim, seed=4))
    assert not _axes_parallel(spline.affine, turned.affine)
    np.testing.assert_allclose(spline.mapped_points(turned), spline(turned.points()), atol=1e-5)
    # jit with the grid's matrix traced, vmap over coefficients.
    grid = _shrunk(image, 2).grid
    jitted = jax.jit(lambda c, g: BSpline(c, control.affine).on_parallel_grid(g).field)(coefficients, grid)
    np.testing.assert_allclose(jitted, spline.on_parallel_grid(grid).field, atol=1e-5)
    batch = np.stack([coefficients, -0.5 * coefficients, 2.0 * coefficients])
    assert_vmap_matches_loop(lambda c: BSpline(c, control.affine).on_parallel_grid(grid).field, batch, atol=1e-4)
    with pytest.raises(ValueError, match="2-D grid"):
        BSpline(np.zeros((5, 5, 5, 3), np.float32)).on_parallel_grid(Grid((4, 4)))


def test_bspline_on_parallel_grid_gradient_matches_finite_differences():
    grid = Grid((17, 14), np.diag([1.5, 0.8, 1.0]).astype(np.float32))
    control = BSpline.control_grid(grid, 5.0)
    fixed = np.random.default_rng(0).standard_normal(grid.shape).astype(np.float32)
    moving = Image(np.asarray(gaussian_smooth(fixed, 1.5)), grid.affine)
    coefficients = np.random.default_rng(1).normal(0.0, 0.5, control.shape + (2,)).astype(np.float32)

    def loss(c):
        dense = BSpline(c, control.affine).on_parallel_grid(grid)
        return jnp.mean((warp(moving, dense, grid).data - fixed) ** 2)

    def per_point_loss(c):  # the spline's 4^d taps at every voxel centre, then the same linear sampling
        mapped = BSpline(c, control.affine)(grid.points())
        return jnp.mean((sample(moving.data, moving.grid.world_to_index(mapped), order=1) - fixed) ** 2)

    assert_grad_matches_fd(loss, coefficients, eps=1e-4)
    np.testing.assert_allclose(jax.grad(loss)(coefficients), jax.grad(per_point_loss)(coefficients), atol=1e-5)


def test_kernel_transform_fits_landmarks_exactly():
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 20, (12, 2)).astype(np.float32)
    target = source + rng.normal(0, 0.8, source.shape).astype(np.float32)
    t = KernelTransform.fit(source, target, sigma=15.0)
    np.testing.assert_allclose(t(source), target, atol=2e-3)
    np.testing.assert_allclose(wendland(jnp.array([0.0, 0.5, 1.0, 2.0])), [1.0, 0.1875, 0.0, 0.0], atol=1e-7)
    # The norm at a centre has no derivative; the transform's does, and it is finite.
    assert_finite_grad(lambda p: jnp.sum(t(p)), jnp.asarray(source))


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_determinant_analytic(ndim):
    grid = GRIDS[ndim]
    rng = np.random.default_rng(0)
    affine = Affine.from_params(rng.uniform(-0.2, 0.2, affine_param_count("affine", ndim)), kind="affine", ndim=ndim)
    np.testing.assert_allclose(jacobian_determinant(affine, grid), np.linalg.det(affine.linear), rtol=1e-4)
    # u = (a * x0^2 / 2, 0, ...): J = diag(1 + a x0, 1, ...).
    points = np.asarray(grid.points())
    field = np.zeros_like(points)
    field[..., 0] = 0.01 * points[..., 0] ** 2 / 2
    det = jacobian_determinant(Displacement(field, grid.affine), grid)
    np.testing.assert_allclose(interior(det[..., None])[..., 0], interior((1 + 0.01 * points[..., 0])[..., None])[..., 0], rtol=1e-4)


# ---------------------------------------------------------------- jit / vmap / grad


def _transform_cases(grid):
    return {
        "displacement": lambda x: Displacement(x, grid.affine),
        "velocity": lambda x: Velocity(x, grid.affine, steps=4),
        "bspline": lambda x: BSpline(x, BSpline.control_grid(grid, 6.0).affine),
    }


def _parameter_shape(name, grid):
    if name == "bspline":
        return BSpline.control_grid(grid, 6.0).shape + (grid.ndim,)
    return grid.shape + (grid.ndim,)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["displacement", "velocity", "bspline"])
def test_dense_transforms_jit_vmap_grad(ndim, name):
    grid = GRIDS[ndim]
    make = _transform_cases(grid)[name]
    fixed = np.random.default_rng(0).standard_normal(grid.shape).astype(np.float32)
    moving = Image(np.asarray(gaussian_smooth(fixed, 1.0)), grid.affine)
    shape = _parameter_shape(name, grid)
    rng = np.random.default_rng(1)
    params = (0.3 * rng.standard_normal(shape)).astype(np.float32)

    def loss(p):
        return jnp.mean((warp(moving, make(p), grid).data - fixed) ** 2)

    assert_jit_matches(loss, params, rtol=1e-4)
    batch = (0.3 * rng.standard_normal((3,) + shape)).astype(np.float32)
    assert_vmap_matches_loop(lambda p: warp(moving, make(p), grid).data, batch, atol=1e-5)
    if ndim == 2:
        assert_grad_matches_fd(loss, params, eps=1e-4)


def test_vmap_over_images_with_different_affines():
    grid = GRIDS[2]
    affines = jnp.stack([jnp.asarray(grid.affine).at[0, 2].add(s) for s in (0.0, 1.0, 2.5)])
    data = jnp.stack([jnp.asarray(np.random.default_rng(s).standard_normal(grid.shape), jnp.float32) for s in range(3)])
    t = Affine.from_params(jnp.array([0.5, -0.5]), kind="translation", ndim=2)
    assert_vmap_matches_loop(lambda d, a: warp(Image(d, a), t, grid).data, data, affines)


def test_compose_flattens_and_maps_like_nested_calls():
    grid = GRIDS[2]
    a = Affine.from_params(jnp.array([0.1, 1.0, 2.0]), kind="rigid", ndim=2)
    d = Displacement(smooth_field(grid, 1.0), grid.affine)
    c = compose(a, compose(d, a))
    assert isinstance(c, Compose) and len(c.transforms) == 3
    points = grid.points()
    np.testing.assert_allclose(c(points), a(d(a(points))), atol=1e-4)
    np.testing.assert_allclose(compose(a, d).mapped_points(grid), a(d(points)), atol=1e-4)


def test_labels_warp_with_nearest_stays_integer():
    grid = GRIDS[3]
    labels = np.random.default_rng(0).integers(0, 5, grid.shape).astype(np.int32)
    warped = warp(Image(labels, grid.affine), Displacement(smooth_field(grid, 2.0), grid.affine), order=0)
    assert warped.data.dtype == jnp.int32
    assert set(np.unique(warped.data)) <= set(range(5))


def test_errors_name_the_problem():
    grid = GRIDS[3]
    with pytest.raises(ValueError, match=r"\(\*spatial, d\)"):
        Displacement(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="parameters"):
        Affine.from_params(jnp.zeros(5), kind="rigid", ndim=3)
    with pytest.raises(ValueError, match="unknown affine kind"):
        affine_param_count("shear", 3)
    with pytest.raises(ValueError, match="2-D transform"):
        warp(Image(np.zeros(grid.shape, np.float32), grid.affine), Affine.identity(2))
    with pytest.raises(ValueError, match="needs a grid"):
        invert(BSpline.zeros(grid, 5.0))
    with pytest.raises(ValueError, match="different ranks"):
        Compose([Affine.identity(2), Affine.identity(3)])


def test_test_references_in_the_package_docstrings_exist():
    # ``tests/<file>.py::<name>`` in a docstring must name a function or variable that
    # is there (transforms.py pointed at a TRANSFORM_CASES that never existed).
    root = Path(__file__).resolve().parents[1]
    references = [
        (source, path, name)
        for source in sorted((root / "jaxreg").rglob("*.py"))
        for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", source.read_text())
    ]
    assert references  # the pattern still finds the ones there are
    for source, path, name in references:
        text = (root / path).read_text()
        assert re.search(rf"^(def {name}\(|{name}\s*=)", text, re.MULTILINE), f"{source.name} cites {path}::{name}, not in {path}"
