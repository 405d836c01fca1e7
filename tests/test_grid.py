import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import differential
from jaxreg import grid as grid_module
from jaxreg.grid import Grid, Image, as_image, precise_matmul
from jaxreg.transforms import rotation_matrix
from tests.helpers import assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop


def oblique_affine(ndim, seed=0):
    rng = np.random.default_rng(seed)
    affine = np.eye(ndim + 1, dtype=np.float32)
    rotation = np.asarray(rotation_matrix(jnp.asarray(rng.uniform(-0.5, 0.5, ndim * (ndim - 1) // 2)), ndim))
    affine[:ndim, :ndim] = rotation @ np.diag(rng.uniform(0.7, 2.0, ndim))
    affine[:ndim, ndim] = rng.uniform(-50, 50, ndim)
    return affine


@pytest.mark.parametrize("ndim", [2, 3])
def test_points_follow_the_affine_and_round_trip(ndim):
    affine = oblique_affine(ndim)
    grid = Grid((5, 6, 4)[:ndim], affine)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    expected = index @ affine[:ndim, :ndim].T + affine[:ndim, ndim]
    np.testing.assert_allclose(grid.points(), expected, atol=1e-4)
    np.testing.assert_allclose(grid.world_to_index(grid.points()), index, atol=1e-4)
    np.testing.assert_allclose(grid.spacing, np.linalg.norm(affine[:ndim, :ndim], axis=0), rtol=1e-6)


def test_from_spacing_and_plain_arrays_use_identity():
    grid = Grid.from_spacing((3, 4), spacing=(2.0, 0.5), origin=(10.0, -1.0))
    np.testing.assert_allclose(grid.points()[2, 3], [14.0, 0.5])
    image = as_image(np.zeros((3, 4, 5), np.float32))
    np.testing.assert_array_equal(image.affine, np.eye(4))
    assert image.grid.shape == (3, 4, 5) and not image.has_channels
    channels = as_image(np.zeros((3, 4, 2), np.float32), ndim=2)
    assert channels.has_channels and channels.grid.shape == (3, 4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_scaled_grid_covers_the_same_extent(ndim):
    grid = Grid((8, 10, 6)[:ndim], oblique_affine(ndim, seed=2))
    coarse = grid.scaled(2)
    assert coarse.shape == tuple(n // 2 for n in grid.shape)
    fine_points = np.asarray(grid.points())
    block_centres = fine_points.reshape(sum(((n // 2, 2) for n in grid.shape), ()) + (ndim,)).mean(axis=tuple(range(1, 2 * ndim, 2)))
    np.testing.assert_allclose(coarse.points(), block_centres, atol=1e-4)
    np.testing.assert_allclose(coarse.scaled(0.5).affine, grid.affine, atol=1e-5)


def test_grid_and_image_are_pytrees_under_jit_and_vmap():
    grid = Grid((4, 5), oblique_affine(2))
    assert_jit_matches(lambda g: g.points(), grid)
    affines = jnp.stack([jnp.asarray(oblique_affine(2, seed=s)) for s in range(3)])
    assert_vmap_matches_loop(lambda a: Grid((4, 5), a).points(), affines, atol=1e-4)
    image = Image(jnp.ones((4, 5)), grid.affine)
    doubled = jax.jit(lambda im: im.with_data(im.data * 2))(image)
    assert isinstance(doubled, Image) and float(doubled.data.sum()) == 40.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_points_and_world_to_index_are_differentiable_in_the_affine(ndim):
    """A learned or optimised voxel-to-world matrix (a rigid fit of the grid itself) needs
    the derivative of the voxel centres in it: for ``sum(W * points)`` that is
    ``sum_i W_i [idx_i, 1]^T`` in the top rows and nothing in the last."""
    affine = oblique_affine(ndim, seed=5)
    shape = (4, 5, 3)[:ndim]
    rng = np.random.default_rng(6)
    weights = jnp.asarray(rng.standard_normal(shape + (ndim,)).astype(np.float32))

    def energy(a):
        return jnp.sum(weights * Grid(shape, a).points())

    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, ndim)
    homogeneous = np.concatenate([index, np.ones((len(index), 1))], axis=1)
    expected = np.zeros((ndim + 1, ndim + 1))
    expected[:ndim] = np.asarray(weights).reshape(-1, ndim).T @ homogeneous
    np.testing.assert_allclose(jax.grad(energy)(jnp.asarray(affine)), expected, rtol=1e-5, atol=1e-3)
    assert_grad_matches_fd(energy, affine)
    # world_to_index goes through the inverse; its matrix varies in the top rows only, as an
    # affine map's does (the bottom row stays (0, ..., 0, 1)).
    world = jnp.asarray(rng.uniform(-20, 20, (6, ndim)).astype(np.float32))

    def indices(top):
        bottom = jnp.zeros((1, ndim + 1), top.dtype).at[0, ndim].set(1.0)
        return jnp.sum(jnp.sin(Grid(shape, jnp.concatenate([top, bottom])).world_to_index(world)))

    assert_grad_matches_fd(indices, affine[:ndim], eps=1e-5)
    # Under vmap over matrices the gradients are each matrix's own.
    tops = jnp.stack([jnp.asarray(oblique_affine(ndim, seed=s)[:ndim]) for s in range(3)])
    assert_vmap_matches_loop(jax.grad(indices), tops, rtol=1e-4, atol=1e-4)


def test_bad_grids_and_images_raise():
    with pytest.raises(ValueError, match="positive size"):
        Grid((4, 0))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        Grid((4, 5), np.eye(4))
    with pytest.raises(ValueError, match="spacing must be positive"):
        Grid.from_spacing((4, 5), spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="axes"):
        Image(np.zeros((4, 5, 6, 7)), np.eye(3))
    with pytest.raises(ValueError, match="empty"):
        Image(np.zeros((4, 0)))


# ------------------------------------------------------------------- differential


@pytest.mark.parametrize("ndim", [2, 3])
def test_spatial_gradient_matches_numpy(ndim):
    x = np.random.default_rng(0).standard_normal((7, 6, 5)[:ndim]).astype(np.float32)
    spacing = (0.5, 2.0, 1.5)[:ndim]
    expected = np.stack(np.gradient(x, *spacing), -1)
    np.testing.assert_allclose(differential.spatial_gradient(x, spacing), expected, atol=1e-5)
    channels = np.stack([x, 2 * x], -1)
    np.testing.assert_allclose(differential.spatial_gradient(channels, spacing, ndim=ndim)[..., 1, :], 2 * expected, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_affine_map_on_oblique_grid_is_exact(ndim):
    grid = Grid((6, 5, 4)[:ndim], oblique_affine(ndim, seed=3))
    matrix = np.random.default_rng(1).uniform(-0.3, 0.3, (ndim, ndim)) + np.eye(ndim)
    mapped = precise_matmul(grid.points(), jnp.asarray(matrix.T, jnp.float32)) + 1.0  # TF32 on a GPU otherwise
    jac = differential.jacobian_of_map(mapped, grid)
    np.testing.assert_allclose(jac, np.broadcast_to(matrix, jac.shape), atol=1e-4)
    np.testing.assert_allclose(differential.jacobian_determinant_of_map(mapped, grid), np.linalg.det(matrix), rtol=1e-4)


def test_jacobian_of_map_gradients_match_finite_differences_and_forward_mode():
    """The Jacobian's points pass through an identity whose derivative is a matrix
    product (so that XLA sums their cotangent once): value, reverse mode, forward mode,
    jit and vmap all as for the plain differences."""
    grid = Grid((5, 4, 3), oblique_affine(3, seed=2))
    rng = np.random.default_rng(4)
    mapped = np.asarray(grid.points()) + 0.2 * rng.standard_normal(grid.shape + (3,)).astype(np.float32)
    weights = jnp.asarray(rng.standard_normal(grid.shape + (3, 3)).astype(np.float32))

    def energy(points):
        return jnp.sum(weights * differential.jacobian_of_map(points, grid) ** 2)

    assert_grad_matches_fd(energy, mapped)
    direction = jnp.asarray(rng.standard_normal(mapped.shape).astype(np.float32))
    _, forward = jax.jvp(energy, (jnp.asarray(mapped),), (direction,))
    np.testing.assert_allclose(forward, jnp.sum(jax.grad(energy)(jnp.asarray(mapped)) * direction), rtol=1e-4)
    # the identity itself: free in the forward pass, a product with I in both derivatives
    points = jnp.asarray(mapped)
    assert "dot_general" not in str(jax.make_jaxpr(grid_module.cotangent_summed_apart)(points))
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(grid_module.cotangent_summed_apart(p))))(points))
    np.testing.assert_array_equal(jax.jit(jax.vmap(lambda p: differential.jacobian_of_map(p, grid)))(points[None]),
                                  differential.jacobian_of_map(points, grid)[None])


def test_determinant_matches_numpy_and_gradient():
    m = np.random.default_rng(0).standard_normal((5, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(differential.determinant(m), np.linalg.det(m), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(differential.determinant(m[:, :2, :2]), np.linalg.det(m[:, :2, :2]), rtol=1e-4, atol=1e-5)
    assert_grad_matches_fd(lambda a: jnp.sum(differential.determinant(a)), m)


def test_apply_linear_matches_matmul_with_gradients_and_keeps_numpy_on_the_host():
    from jaxreg.grid import apply_linear

    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((4, 6, 3)).astype(np.float32)
    linear = rng.standard_normal((3, 3)).astype(np.float32)
    offset = rng.standard_normal(3).astype(np.float32)
    out = apply_linear(linear, vectors, offset)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, vectors @ linear.T + offset, rtol=1e-5, atol=1e-6)
    weights = rng.standard_normal((4, 6, 3)).astype(np.float32)
    grad_v, grad_l = jax.grad(lambda v, m: jnp.sum(weights * apply_linear(m, v)), argnums=(0, 1))(vectors, linear)
    np.testing.assert_allclose(grad_v, weights @ linear, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_l, np.einsum("abi,abk->ik", weights, vectors), rtol=1e-4, atol=1e-4)
    batched = jax.jit(jax.vmap(lambda v: apply_linear(jnp.asarray(linear), v)))(vectors)
    np.testing.assert_allclose(batched, vectors @ linear.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(4, 8), (5, 3), (6,), (7,), (2, 3, 5, 3)])
def test_points_matmul_matches_numpy_under_jit_vmap_and_grad(lead):
    rng = np.random.default_rng(8)
    d, e = (3, 3) if lead[-1] != 7 else (2, 4)
    points = rng.standard_normal(lead + (d,)).astype(np.float32)
    matrix = rng.standard_normal((d, e)).astype(np.float32)
    expected = points.astype(np.float64) @ matrix.astype(np.float64)
    np.testing.assert_allclose(grid_module.points_matmul(points, jnp.asarray(matrix)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(grid_module.points_matmul)(points, matrix), expected, rtol=1e-5, atol=1e-5)
    batched = jax.vmap(grid_module.points_matmul, in_axes=(0, None))(jnp.stack([points, 2 * points]), matrix)
    np.testing.assert_allclose(batched[1], 2 * expected, rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.standard_normal(lead + (e,)).astype(np.float32))
    assert_grad_matches_fd(lambda p: jnp.sum(weights * jnp.sin(grid_module.points_matmul(p, jnp.asarray(matrix)))), points)
    # A non-finite point turns at most the other points of its block (16 rows) NaN.
    bad = np.tile(points.reshape(-1, d), (40 // math.prod(lead) + 1, 1))[:32]
    bad[0, 0] = np.inf
    out = np.asarray(grid_module.points_matmul(bad, jnp.asarray(matrix)))
    assert not np.all(np.isfinite(out[0]))
    assert np.all(np.isfinite(out[grid_module._POINTS_PER_BLOCK :]))


def test_apply_linear_sums_the_cotangent_of_few_3d_points_apart():
    """Up to _SUM_APART_MAX_POINTS 3-D points, the points' cotangent passes through a
    product with I (an array of its own); 2-D points and larger sets are left to XLA."""
    linear = jnp.asarray(np.random.default_rng(6).standard_normal((3, 3)).astype(np.float32))

    def backward(points):
        matrix = linear[: points.shape[-1], : points.shape[-1]]
        return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(grid_module.apply_linear(matrix, p) ** 2)))(points))

    few = grid_module._SUM_APART_MAX_POINTS
    assert backward(jnp.zeros((few, 3))).count("dot_general") == 1
    assert "dot_general" not in backward(jnp.zeros((few + 1, 3)))
    assert "dot_general" not in backward(jnp.zeros((few, 2)))
    assert "dot_general" not in str(jax.make_jaxpr(lambda p: grid_module.apply_linear(linear, p))(jnp.zeros((8, 3))))
    # same values and gradients either way
    points = jnp.asarray(np.random.default_rng(7).standard_normal((5, 3)).astype(np.float32))
    energy = lambda p: jnp.sum(jnp.sin(grid_module.apply_linear(linear, p)))  # noqa: E731
    np.testing.assert_allclose(jax.grad(energy)(points), jnp.cos(points @ linear.T) @ linear, rtol=1e-5, atol=1e-6)
