import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import filters
from jaxreg.grid import Grid, Image
from tests.helpers import assert_finite_grad, assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop

SHAPES = [(24, 20), (12, 10, 8)]


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- gaussian -------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,truncate", [(0.7, 4.0), (1.5, 3.5), (3.0, 4.0), (2.0, 1.0)])
def test_gaussian_kernel_is_scipys_impulse_response(sigma, truncate):
    kernel = filters.gaussian_kernel_1d(sigma, truncate=truncate)
    radius = int(truncate * sigma + 0.5)
    assert kernel.shape == (2 * radius + 1,)
    delta = np.zeros(4 * radius + 3)
    delta[2 * radius + 1] = 1.0
    response = ndi.gaussian_filter1d(delta, sigma, truncate=truncate, mode="constant")
    np.testing.assert_allclose(kernel, response[radius + 1 : 3 * radius + 2], atol=1e-12)
    assert kernel.sum() == pytest.approx(1.0)


def test_gaussian_kernel_zero_sigma_is_identity():
    assert filters.gaussian_kernel_1d(0.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="sigma"):
        filters.gaussian_kernel_1d(-1.0)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror", "wrap", "constant"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_smooth_matches_scipy(mode, shape):
    x = _random(shape)
    # per-axis sigma, one axis unsmoothed, one kernel wider than its axis
    sigma = (1.3, 0.0, 2.5)[: len(shape)] if len(shape) == 3 else (6.0, 0.8)
    out = filters.gaussian_smooth(x, sigma, mode=mode)
    ref = ndi.gaussian_filter(x.astype(np.float64), sigma, mode=mode)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror", "wrap", "constant"])
def test_gaussian_smooth_channels_last_leaves_channels_alone(mode):
    # channels-last fields take the banded-matrix path: every boundary mode must match too
    x = _random((12, 10, 8, 3))
    out = filters.gaussian_smooth(x, (1.0, 2.0, 0.5), ndim=3, truncate=3.0, mode=mode)
    ref = ndi.gaussian_filter(x.astype(np.float64), (1.0, 2.0, 0.5, 0.0), truncate=3.0, mode=mode)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "constant"])
@pytest.mark.parametrize("sigmas", [(1.0, 0.0, 2.0), (0.0, 0.0, 1.5), (0.5, 0.5, 0.5)])
def test_gaussian_smooth_channels_last_with_unsmoothed_axes_matches_scipy(mode, sigmas):
    # the product path rotates every axis to the end, smoothed or not, and back
    x = _random((7, 9, 5, 2), seed=3)
    out = filters.gaussian_smooth(x, sigmas, ndim=3, mode=mode)
    ref = ndi.gaussian_filter(x.astype(np.float64), sigmas + (0.0,), mode=mode)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_gaussian_smooth_wide_kernel_on_a_scalar_image_matches_scipy():
    # sigma 6 (49 taps) takes the matrix-product path without channels
    x = _random((50, 60), seed=4)
    out = filters.gaussian_smooth(x, (6.0, 0.0))
    np.testing.assert_allclose(np.asarray(out), ndi.gaussian_filter(x.astype(np.float64), (6.0, 0.0), mode="nearest"), atol=1e-5)
    smoothed = jax.jit(jax.vmap(lambda a: filters.gaussian_smooth(a, 6.0)))(np.stack([x, 2 * x]))
    np.testing.assert_allclose(np.asarray(smoothed[1]), 2 * np.asarray(filters.gaussian_smooth(x, 6.0)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["shifted", "products"])
@pytest.mark.parametrize("mode", ["nearest", "reflect", "constant"])
@pytest.mark.parametrize("shape, ndim", [((14, 12, 10), 3), ((11, 9), 2), ((9, 8, 7, 3), 3), ((10, 9, 2), 2)])
def test_gaussian_smooth_methods_match_scipy(method, mode, shape, ndim):
    # either method on a scalar image or a channels-last field, whatever "auto" would pick
    x = _random(shape, seed=5)
    sigma = (1.0, 0.0, 2.5)[:ndim]
    out = filters.gaussian_smooth(x, sigma, ndim=ndim, mode=mode, method=method)
    ref = ndi.gaussian_filter(x.astype(np.float64), sigma + (0.0,) * (len(shape) - ndim), mode=mode)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["shifted", "products"])
def test_gaussian_smooth_methods_jit_vmap_grad(method):
    x = _random((9, 8, 7), seed=6)
    smooth = lambda im: filters.gaussian_smooth(im, 1.1, method=method)
    assert_jit_matches(smooth, x)
    assert_vmap_matches_loop(smooth, np.stack([x, 2 * x, x**2]))
    weights = _random((9, 8, 7), seed=7)
    assert_grad_matches_fd(lambda im: jnp.sum(weights * smooth(im) ** 2), x)


def test_gaussian_smooth_errors():
    x = jnp.zeros((6, 5))
    with pytest.raises(ValueError, match="sigma"):
        filters.gaussian_smooth(x, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        filters.gaussian_smooth(x, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="mode"):
        filters.gaussian_smooth(x, 1.0, mode="bogus")
    with pytest.raises(ValueError, match="method"):
        filters.gaussian_smooth(x, 1.0, method="fft")
    with pytest.raises(ValueError, match="3 axes"):
        filters.gaussian_smooth(jnp.zeros((6, 5, 4)), 1.0, ndim=1)


def test_gaussian_smooth_integer_input_is_float32_and_float64_kept():
    assert filters.gaussian_smooth(jnp.ones((5, 4), jnp.int32), 1.0).dtype == jnp.float32
    with jax.enable_x64(True):
        assert filters.gaussian_smooth(jnp.ones((5, 4), jnp.float64), 1.0).dtype == jnp.float64


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_smooth_jit_vmap_grad(shape):
    x = _random(shape)
    smooth = lambda im: filters.gaussian_smooth(im, 1.2, mode="reflect")
    assert_jit_matches(smooth, x)
    assert_vmap_matches_loop(smooth, np.stack([x, 2 * x, x**2]))
    weights = _random(shape, seed=1)
    energy = lambda im: jnp.sum(weights * filters.gaussian_smooth(im, (1.0,) + (0.7,) * (len(shape) - 1)) ** 2)
    assert_grad_matches_fd(energy, x)
    assert_finite_grad(energy, jnp.ones(shape))


# -- box ------------------------------------------------------------------------------------
def _direct_box_sum(x, radii):
    """Window sums by explicit shifted additions of a zero-padded array."""
    padded = np.pad(x.astype(np.float64), [(r, r) for r in radii] + [(0, 0)] * (x.ndim - len(radii)))
    out = np.zeros(x.shape)
    for offset in np.ndindex(*[2 * r + 1 for r in radii]):
        index = tuple(slice(o, o + n) for o, n in zip(offset, x.shape))
        out += padded[index]
    return out


@pytest.mark.parametrize("shape,radius", [((24, 20), 2), ((24, 20), (3, 0)), ((12, 10, 8), 1), ((12, 10, 8), (2, 4, 9))])
def test_box_sum_matches_direct_sums(shape, radius):
    x = _random(shape)
    radii = radius if isinstance(radius, tuple) else (radius,) * len(shape)
    np.testing.assert_allclose(np.asarray(filters.box_sum(x, radius)), _direct_box_sum(x, radii), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_box_mean_matches_uniform_filter(shape):
    x = _random(shape)
    out = filters.box_mean(x, 2)
    ref = ndi.uniform_filter(x.astype(np.float64), 5, mode="constant")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_box_filters_channels_last():
    x = _random((12, 10, 8, 2))
    out = filters.box_sum(x, (1, 2, 3), ndim=3)
    np.testing.assert_allclose(np.asarray(out), _direct_box_sum(x, (1, 2, 3)), atol=1e-4)
    mean = filters.box_mean(x, 1, ndim=3)
    ref = ndi.uniform_filter(x.astype(np.float64), (3, 3, 3, 1), mode="constant")
    np.testing.assert_allclose(np.asarray(mean), ref, atol=1e-5)


def test_box_sum_cost_does_not_depend_on_radius():
    x = jnp.zeros((80, 90))

    def operations(r):
        text = jax.jit(lambda im: filters.box_sum(im, r)).lower(x).as_text()
        return collections.Counter(re.findall(r"stablehlo\.[a-z_]+", text))

    # Small windows: one reduce_window per axis, whatever the radius.
    assert operations(1) == operations(9) and operations(1)["stablehlo.reduce_window"] == 2
    # Large windows: cumulative sums; the same program whatever the radius.
    small, large = operations(17), operations(30)
    assert small == large
    assert sum(small.values()) < 40


@pytest.mark.parametrize("radius", [3, 17, (2, 20)])
def test_box_sum_both_strategies_match_scipy(radius):
    x = np.random.default_rng(4).standard_normal((45, 50)).astype(np.float32)
    radii = radius if isinstance(radius, tuple) else (radius, radius)
    size = tuple(2 * r + 1 for r in radii)
    ref = ndi.uniform_filter(x.astype(np.float64), size, mode="constant") * np.prod(size)
    np.testing.assert_allclose(np.asarray(filters.box_sum(x, radius)), ref, atol=2e-4)


def test_box_errors():
    with pytest.raises(ValueError, match="radius"):
        filters.box_sum(jnp.zeros((5, 4)), -1)
    with pytest.raises(ValueError, match="radius"):
        filters.box_mean(jnp.zeros((5, 4)), 1.5)
    with pytest.raises(ValueError, match="radius"):
        filters.box_sum(jnp.zeros((5, 4)), (1, 1, 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_box_jit_vmap_grad(shape):
    x = _random(shape)
    assert_jit_matches(lambda im: filters.box_sum(im, 2), x)
    assert_vmap_matches_loop(lambda im: filters.box_mean(im, 1), np.stack([x, -x, x * x]))
    weights = _random(shape, seed=2)
    energy = lambda im: jnp.sum(weights * filters.box_mean(im, (2,) + (1,) * (len(shape) - 1)) ** 2)
    assert_grad_matches_fd(energy, x)
    assert_finite_grad(energy, jnp.zeros(shape))


# -- downsample -----------------------------------------------------------------------------
def _reference_downsample(x, factors, ndim):
    sigmas = [filters.antialias_sigma(f) for f in factors] + [0.0] * (x.ndim - ndim)
    smooth = ndi.gaussian_filter(x.astype(np.float64), sigmas, mode="nearest")
    out_shape = Grid(x.shape[:ndim]).scaled(factors).shape
    centres = [(f - 1) / 2 + f * np.arange(m) for f, m in zip(factors, out_shape)]
    coords = np.meshgrid(*centres, indexing="ij")
    if x.ndim == ndim:
        return ndi.map_coordinates(smooth, coords, order=1, mode="nearest")
    return np.stack(
        [ndi.map_coordinates(smooth[..., c], coords, order=1, mode="nearest") for c in range(x.shape[-1])], -1
    )


@pytest.mark.parametrize(
    "shape,factor",
    [((24, 20), 2), ((23, 19), 2), ((25, 21), 3), ((24, 21), (2, 3)), ((22, 17), 2.5), ((12, 10, 8), 2), ((13, 9, 7), 2)],
)
def test_downsample_matches_scipy_reference(shape, factor):
    x = _random(shape)
    factors = factor if isinstance(factor, tuple) else (factor,) * len(shape)
    out = filters.downsample(x, factor)
    assert out.shape == Grid(shape).scaled(factor).shape
    np.testing.assert_allclose(np.asarray(out), _reference_downsample(x, factors, len(shape)), atol=1e-5)


def test_downsample_channels_last():
    x = _random((13, 10, 8, 2))
    out = filters.downsample(x, 2, ndim=3)
    assert out.shape == (6, 5, 4, 2)
    np.testing.assert_allclose(np.asarray(out), _reference_downsample(x, (2, 2, 2), 3), atol=1e-5)


@pytest.mark.parametrize("shape,factor", [((23, 20), 2), ((25, 19), 3), ((13, 10, 7), 2), ((12, 10, 8), 4)])
def test_downsample_constant_is_constant(shape, factor):
    out = filters.downsample(jnp.full(shape, 3.25), factor)
    np.testing.assert_allclose(np.asarray(out), 3.25, rtol=1e-6)


@pytest.mark.parametrize("factor", [2, 3])
def test_downsample_ramp_is_the_ramp_at_block_centres(factor):
    shape = (48, 40)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    ramp = 0.5 + 0.25 * index[..., 0] - 0.125 * index[..., 1]
    out = np.asarray(filters.downsample(ramp, factor))
    centres = np.asarray(Grid(shape).scaled(factor).points())  # in fine index units
    expected = 0.5 + 0.25 * centres[..., 0] - 0.125 * centres[..., 1]
    # The "nearest" boundary bends the ramp within the kernel radius of the border only.
    margin = int(4 * filters.antialias_sigma(factor) + 0.5) + factor
    inside = np.all((centres >= margin) & (centres <= np.array(shape) - 1 - margin), axis=-1)
    assert inside.sum() >= 20
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-5)


def test_downsample_jit_vmap_grad():
    x = _random((13, 10, 8))
    assert_jit_matches(lambda im: filters.downsample(im, 2), x)
    assert_vmap_matches_loop(lambda im: filters.downsample(im, (2, 3, 2)), np.stack([x, 2 * x]))
    weights = _random((6, 3, 4), seed=3)
    assert_grad_matches_fd(lambda im: jnp.sum(weights * filters.downsample(im, (2, 3, 2)) ** 2), x)
    y = _random((22, 17))
    weights = _random((9, 7), seed=4)
    assert_grad_matches_fd(lambda im: jnp.sum(weights * filters.downsample(im, 2.5) ** 2), y)


def test_antialias_sigma():
    assert filters.antialias_sigma(1) == 0.0
    assert filters.antialias_sigma(0.5) == 0.0
    assert filters.antialias_sigma(2) == pytest.approx(0.5 * np.sqrt(3))
    assert filters.antialias_sigma(100) == pytest.approx(50, rel=1e-3)


# -- pyramid --------------------------------------------------------------------------------
def _oblique_affine(ndim):
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = q @ np.diag(rng.uniform(0.5, 2.0, ndim))
    affine[:ndim, ndim] = rng.uniform(-20, 20, ndim)
    return affine.astype(np.float32)


@pytest.mark.parametrize("shape", [(24, 20), (16, 12, 8)])
def test_pyramid_levels_shapes_and_affines(shape):
    ndim = len(shape)
    affine = _oblique_affine(ndim)
    x = _random(shape)
    levels = filters.pyramid(x, 3, affine=affine)
    grid = Grid(shape, affine)
    assert len(levels) == 3
    for k, level in zip((2, 1, 0), levels):
        assert isinstance(level, Image)
        scaled = grid.scaled(2**k)
        assert level.shape == scaled.shape
        np.testing.assert_allclose(np.asarray(level.affine), np.asarray(scaled.affine), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(levels[-1].data), x)
    np.testing.assert_allclose(np.asarray(levels[0].data), np.asarray(filters.downsample(x, 4)), atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 20), (16, 12, 8)])
def test_pyramid_coarse_centres_are_world_centres_of_fine_blocks(shape):
    ndim = len(shape)
    fine = Grid(shape, _oblique_affine(ndim))
    levels = filters.pyramid(Image(jnp.zeros(shape), fine.affine), 3)
    fine_points = np.asarray(fine.points(), dtype=np.float64)
    for k, level in zip((2, 1), levels):
        f = 2**k
        coarse_points = np.asarray(level.grid.points())
        # every coarse voxel here covers a full block: mean of the block's world points
        blocks = fine_points.reshape(sum(((n // f, f) for n in shape), ()) + (ndim,))
        block_centres = blocks.mean(axis=tuple(range(1, 2 * ndim, 2)))
        np.testing.assert_allclose(coarse_points, block_centres, atol=1e-3)


def test_pyramid_channels_image_and_errors():
    x = _random((16, 12, 2))
    levels = filters.pyramid(x, 2, ndim=2)
    assert [level.shape for level in levels] == [(8, 6, 2), (16, 12, 2)]
    assert all(level.ndim == 2 and level.has_channels for level in levels)
    image = Image(x, np.diag([2.0, 3.0, 1.0]))
    assert filters.pyramid(image, 1) == [image]
    np.testing.assert_allclose(np.asarray(filters.pyramid(image, 2)[0].grid.spacing), [4.0, 6.0])
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="levels"):
            filters.pyramid(x, bad, ndim=2)
    with pytest.raises(ValueError, match="affine"):
        filters.pyramid(image, 2, affine=np.eye(3))


def test_pyramid_factor_three_and_jit():
    x = _random((27, 18))
    levels = jax.jit(lambda im: [level.data for level in filters.pyramid(im, 3, factor=3)])(x)
    assert [level.shape for level in levels] == [(3, 2), (9, 6), (27, 18)]
    np.testing.assert_allclose(np.asarray(levels[0]), np.asarray(filters.downsample(x, 9)), atol=1e-6)
