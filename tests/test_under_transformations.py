"""Public functions whose own tests were eager only, checked under ``jit`` and ``vmap``,
and against finite differences where they are differentiable.

Each test compares with an independent answer (numpy, scipy, a closed form, a loop of
single calls), so that a transformation that changed a number would fail it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from jaxreg import differential, io, metrics, synthetic
from jaxreg.filters import downsample, gaussian_smooth, pyramid
from jaxreg.grid import Grid, Image
from jaxreg.losses.similarity import joint_histogram, mind_ssc_descriptor
from jaxreg.registration import cap_step, normalize_intensity, register_affine, register_bspline, register_greedy, register_syn, smooth_updates
from jaxreg.sampling import spline_prefilter
from jaxreg.transforms import Affine, Displacement, KernelTransform, compose, invert, jacobian_determinant, wendland

from helpers import assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop, smooth_field

RNG = np.random.default_rng(20261123)


# -------------------------------------------------------------------------- transforms


def test_wendland_and_its_derivative_match_the_closed_form_under_jit_and_vmap():
    r = jnp.linspace(0.0, 1.5, 60)
    expected = np.where(r < 1, (1 - r) ** 4 * (4 * r + 1), 0.0)
    np.testing.assert_allclose(assert_jit_matches(wendland, r), expected, atol=1e-6)
    assert_vmap_matches_loop(wendland, r.reshape(3, -1))
    derivative = jax.vmap(jax.grad(wendland))(r)
    np.testing.assert_allclose(derivative, np.where(r < 1, -20 * r * (1 - r) ** 3, 0.0), atol=1e-5)


def _landmarks(count=8, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.uniform(0, 40, (count, 2)).astype(np.float32)
    return source, source + rng.normal(0, 2, source.shape).astype(np.float32)


def test_kernel_transform_fit_is_exact_under_jit_and_vmaps_over_targets_like_a_loop():
    source, target = _landmarks()

    def fit_and_map(target, points):
        return KernelTransform.fit(source, target, sigma=30.0)(points)

    np.testing.assert_allclose(jax.jit(fit_and_map)(target, source), target, atol=2e-3)
    targets = jnp.stack([target, target + 1.5, source])
    points = jnp.asarray(RNG.uniform(0, 40, (3, 10, 2)), jnp.float32)
    assert_vmap_matches_loop(fit_and_map, targets, points, rtol=1e-4, atol=1e-4)
    # The identity's landmarks give the identity everywhere (the affine part absorbs it).
    np.testing.assert_allclose(fit_and_map(source, points[0]), points[0], atol=1e-3)


def test_kernel_transform_gradients_match_finite_differences():
    source, target = _landmarks(seed=1)
    points = jnp.asarray(RNG.uniform(5, 35, (12, 2)))  # away from the centres' kinks

    def of_points(p):
        return jnp.sum(jnp.sin(KernelTransform.fit(source, target, sigma=30.0)(p) / 7.0))

    def of_targets(t):
        transform = KernelTransform(source, t - source, 30.0)  # weights are the free parameters
        return jnp.sum(jnp.sin(transform(points) / 7.0))

    assert_grad_matches_fd(of_points, points)
    assert_grad_matches_fd(of_targets, jnp.asarray(target))


def test_invert_is_exact_for_affines_under_vmap_and_differentiable():
    params = jnp.asarray(RNG.normal(0, [0.1, 0.05, 0.05, 0.1, 2.0, 2.0], (4, 6)), jnp.float32)

    def inverse_matrix(p):
        return invert(Affine.from_params(p, kind="affine", ndim=2)).matrix

    batched = assert_vmap_matches_loop(inverse_matrix, params, rtol=1e-5, atol=1e-5)
    for p, inverse in zip(params, batched):
        np.testing.assert_allclose(inverse, np.linalg.inv(np.asarray(Affine.from_params(p, kind="affine", ndim=2).matrix)), atol=1e-5)
    points = jnp.asarray(RNG.uniform(-10, 10, (6, 2)))
    assert_grad_matches_fd(lambda p: jnp.sum(invert(Affine.from_params(p, kind="affine", ndim=2))(points) ** 2), params[0])


def test_numerical_inverse_of_a_displacement_under_jit_and_vmap():
    grid = Grid.from_spacing((24, 24), spacing=1.0)

    def inverse_field(field):
        return invert(Displacement(field, grid.affine), iterations=30).field

    fields = jnp.stack([smooth_field(Grid((24, 24)), 1.5, seed=s) for s in (0, 1)])
    batched = assert_vmap_matches_loop(inverse_field, fields, rtol=1e-4, atol=1e-4)
    assert_jit_matches(inverse_field, fields[0], rtol=1e-4, atol=1e-4)
    for field, inverse in zip(fields, batched):
        forward = Displacement(field, grid.affine)
        round_trip = forward(Displacement(inverse, grid.affine)(grid.points())) - grid.points()
        assert float(jnp.abs(round_trip[4:-4, 4:-4]).max()) < 0.02  # interior, in voxels of 1 mm
    assert_grad_matches_fd(lambda f: jnp.sum(inverse_field(f)[8:16, 8:16] ** 2), fields[0] * 0.5, eps=1e-3, rtol=3e-2)


def test_jacobian_determinant_of_affines_under_vmap_and_of_a_field_against_finite_differences():
    grid = Grid.from_spacing((10, 12), spacing=(1.5, 0.8))
    params = jnp.asarray(RNG.normal(0, [0.1, 0.05, 0.05, 0.1, 2.0, 2.0], (3, 6)), jnp.float32)

    def determinant_map(p):
        return jacobian_determinant(Affine.from_params(p, kind="affine", ndim=2), grid)

    for p, dets in zip(params, assert_vmap_matches_loop(determinant_map, params)):
        linear = np.asarray(Affine.from_params(p, kind="affine", ndim=2).matrix)[:2, :2]
        np.testing.assert_allclose(dets, np.linalg.det(linear), rtol=1e-5)
    field = smooth_field(Grid((10, 12)), 0.8, sigma=2.0)
    assert_grad_matches_fd(lambda f: jnp.sum(jacobian_determinant(Displacement(f, grid.affine), grid) ** 2), field)


def test_compose_under_vmap_and_its_gradient():
    grid = Grid.from_spacing((12, 12), spacing=1.0)
    fields = jnp.stack([smooth_field(Grid((12, 12)), 1.0, sigma=2.0, seed=s) for s in (0, 1, 2)])
    shifts = jnp.asarray(RNG.normal(0, 1.0, (3, 2)), jnp.float32)
    points = jnp.asarray(RNG.uniform(2, 9, (5, 2)))

    def composed(field, shift):
        return compose(Displacement(field, grid.affine), Affine.from_params(shift, kind="translation", ndim=2))(points)

    for field, shift, mapped in zip(fields, shifts, assert_vmap_matches_loop(composed, fields, shifts, atol=1e-5)):
        moved = points + shift
        np.testing.assert_allclose(mapped, Displacement(field, grid.affine)(moved), atol=1e-5)
    assert_grad_matches_fd(lambda s: jnp.sum(composed(fields[0], s) ** 2), shifts[0] + 0.3)


# ----------------------------------------------------------------------------- metrics


def test_inverse_consistency_error_gradient_for_translations_is_the_unit_residual():
    points = jnp.asarray(RNG.uniform(-5, 5, (7, 3)))

    def error(a, b):
        return metrics.inverse_consistency_error(
            Affine.from_params(a, kind="translation", ndim=3), Affine.from_params(b, kind="translation", ndim=3), points
        )

    a, b = jnp.array([1.0, -2.0, 0.5]), jnp.array([-0.5, 1.0, 1.5])
    residual = np.asarray(a + b)
    np.testing.assert_allclose(jax.jit(error)(a, b), np.linalg.norm(residual), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(error)(a, b), residual / np.linalg.norm(residual), rtol=1e-5)
    assert_grad_matches_fd(lambda x: error(x, b), a)
    assert_vmap_matches_loop(error, jnp.stack([a, b]), jnp.stack([b, b]))


def test_distance_transform_under_vmap_matches_scipy_per_item():
    masks = np.ones((3, 9, 11), bool)
    for k, (i, j) in enumerate([(2, 3), (7, 9), (4, 0)]):
        masks[k, i, j] = False
    masks[1, :, 5] = False
    batched = jax.vmap(lambda m: metrics.distance_transform(m, spacing=(1.0, 2.0)))(jnp.asarray(masks))
    for mask, distances in zip(masks, batched):
        np.testing.assert_allclose(distances, ndimage.distance_transform_edt(mask, sampling=(1.0, 2.0)), rtol=1e-5, atol=1e-5)
    assert_jit_matches(lambda m: metrics.distance_transform(m), jnp.asarray(masks[0]))


# ------------------------------------------------------------- sampling, filters, data


def test_spline_prefilter_matches_scipy_under_jit_and_vmap_and_is_linear():
    images = RNG.standard_normal((3, 13, 10)).astype(np.float32)
    coefficients = assert_jit_matches(lambda x: spline_prefilter(x, mode="mirror"), images[0], atol=1e-5)
    np.testing.assert_allclose(coefficients, ndimage.spline_filter(images[0].astype(np.float64), order=3, mode="mirror"), atol=1e-4)
    assert_vmap_matches_loop(lambda x: spline_prefilter(x, mode="mirror"), jnp.asarray(images), atol=1e-5)
    weights = jnp.asarray(RNG.standard_normal((13, 10)))
    assert_grad_matches_fd(lambda x: jnp.sum(weights * spline_prefilter(x, mode="mirror") ** 2), jnp.asarray(images[0]))


def test_pyramid_levels_under_vmap_equal_downsampling_and_have_finite_difference_gradients():
    images = jnp.asarray(RNG.random((2, 16, 12)), jnp.float32)

    def levels(x):
        return tuple(level.data for level in pyramid(x, 3))

    batched = assert_vmap_matches_loop(levels, images, atol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(batched[0][i], downsample(images[i], 4), atol=1e-6)
        np.testing.assert_allclose(batched[1][i], downsample(images[i], 2), atol=1e-6)
        np.testing.assert_array_equal(batched[2][i], images[i])
    assert_grad_matches_fd(lambda x: jnp.sum(pyramid(x, 2)[0].data ** 2), images[0])


def test_blobs_under_vmap_over_keys_equal_single_calls():
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    images, labels = jax.vmap(lambda k: synthetic.blobs(k, (20, 18), labels=3))(keys)
    for key, image, label_map in zip(keys, images, labels):
        single_image, single_labels = synthetic.blobs(key, (20, 18), labels=3)
        np.testing.assert_allclose(image, single_image, atol=1e-6)
        np.testing.assert_array_equal(label_map, single_labels)
        assert set(np.unique(label_map)) <= {0, 1, 2, 3}
    assert not np.array_equal(labels[0], labels[1])


def test_joint_histogram_under_jit_and_vmap_sums_to_one_and_has_finite_difference_gradients():
    a = jnp.asarray(RNG.uniform(0.05, 0.95, (2, 12, 12)), jnp.float32)
    b = jnp.asarray(RNG.uniform(0.05, 0.95, (2, 12, 12)), jnp.float32)

    def histogram(x, y):
        return joint_histogram(x, y, bins=8, intensity_range=(0.0, 1.0))

    hist = assert_jit_matches(histogram, a[0], b[0], atol=1e-7)
    np.testing.assert_allclose(float(jnp.sum(hist)), 1.0, rtol=1e-5)
    # Marginals: every voxel of a spreads unit mass over its bins whatever b is.
    np.testing.assert_allclose(jnp.sum(hist, axis=1), jnp.sum(histogram(a[0], a[0]), axis=1), atol=1e-6)
    assert_vmap_matches_loop(histogram, a, b, atol=1e-7)
    weights = jnp.asarray(RNG.standard_normal((8, 8)))
    assert_grad_matches_fd(lambda x: jnp.sum(weights * histogram(x, b[0])), a[0], eps=1e-4)


def test_spatial_gradient_under_vmap_matches_numpy_and_the_jacobian_determinant_of_a_map_has_fd_gradients():
    images = RNG.standard_normal((2, 9, 11)).astype(np.float32)
    batched = jax.vmap(lambda x: differential.spatial_gradient(x, spacing=(2.0, 0.5)))(jnp.asarray(images))
    for image, gradient in zip(images, batched):
        expected = np.stack(np.gradient(image.astype(np.float64), 2.0, 0.5), axis=-1)
        np.testing.assert_allclose(gradient, expected, atol=1e-5)
    grid = Grid.from_spacing((8, 9), spacing=(1.0, 1.5))
    field = smooth_field(Grid((8, 9)), 0.6, sigma=2.0)
    assert_grad_matches_fd(lambda f: jnp.sum(differential.jacobian_determinant_of_map(grid.points() + f, grid) ** 2), field)
    assert_jit_matches(lambda f: differential.jacobian_determinant_of_map(grid.points() + f, grid), field)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lps_ras_conversions_are_involutions_under_jit_and_vmap(ndim):
    matrices = jnp.asarray(RNG.standard_normal((3, ndim + 1, ndim + 1)), jnp.float32)
    flip = np.diag([-1.0, -1.0] + [1.0] * (ndim - 1))
    for convert in (io.lps_to_ras_affine, io.lps_to_ras_transform, io.ras_to_lps_transform):
        converted = assert_vmap_matches_loop(jax.jit(convert), matrices)
        np.testing.assert_allclose(jax.jit(convert)(converted[0]), matrices[0], atol=1e-6)
    np.testing.assert_allclose(jax.jit(io.lps_to_ras_transform)(matrices[0]), flip @ np.asarray(matrices[0]) @ flip, atol=1e-6)
    np.testing.assert_allclose(jax.jit(io.lps_to_ras_affine)(matrices[0]), flip @ np.asarray(matrices[0]), atol=1e-6)
    vectors = jnp.asarray(RNG.standard_normal((3, 5, ndim)), jnp.float32)
    converted = assert_vmap_matches_loop(jax.jit(io.lps_to_ras_vectors), vectors)
    np.testing.assert_allclose(converted, np.asarray(vectors) * np.diag(flip[:ndim, :ndim]), atol=1e-7)


# ------------------------------------------------------------------------ registration


def test_normalize_intensity_under_vmap_matches_numpy_percentiles():
    stack = jnp.asarray(RNG.gamma(2.0, 100.0, (3, 20, 20)), jnp.float32)
    affine = jnp.eye(3)

    def normalized(data):
        return normalize_intensity(Image(data, affine), low=2.0, high=98.0).data

    for data, result in zip(np.asarray(stack), assert_vmap_matches_loop(normalized, stack, atol=1e-5)):
        low, high = np.percentile(data, [2.0, 98.0])
        np.testing.assert_allclose(result, np.clip((data - low) / (high - low), 0.0, 1.0), atol=1e-4)


def test_smooth_updates_and_cap_step_under_jit_and_vmap():
    fields = jnp.asarray(RNG.standard_normal((3, 10, 9, 2)) * 2.0, jnp.float32)

    def smoothed(u):
        return smooth_updates(1.2).update(u, optax.EmptyState())[0]

    def capped(u):
        return cap_step(1.0).update(u, optax.EmptyState())[0]

    for u, s in zip(fields, assert_vmap_matches_loop(smoothed, fields, atol=1e-6)):
        np.testing.assert_allclose(s, gaussian_smooth(u, 1.2, ndim=2), atol=1e-6)
    for u, c in zip(np.asarray(fields), assert_vmap_matches_loop(jax.jit(capped), fields)):
        norm = np.linalg.norm(u, axis=-1, keepdims=True)
        np.testing.assert_allclose(c, u * np.minimum(1.0, 1.0 / np.sqrt(norm**2 + 1e-12)), rtol=1e-5, atol=1e-6)
    assert_jit_matches(smoothed, fields[0])


def _pairs(shape=(24, 24)):
    images = [synthetic.blobs(jax.random.PRNGKey(s), shape)[0] for s in (3, 4)]
    return jnp.stack(images), jnp.stack(images[::-1])


@pytest.mark.parametrize(
    "run",
    [
        lambda f, m: register_syn(f, m, shrink=(1,), steps=(12,), optimizer=optax.sgd(2.0))[0].field,
        lambda f, m: register_greedy(f, m, shrink=(1,), steps=(12,), optimizer=optax.sgd(2.0))[0].field,
        lambda f, m: register_bspline(f, m, shrink=(1,), steps=(12,), control_spacing=4.0, optimizer=optax.sgd(2.0))[0].coefficients,
    ],
    ids=["syn", "greedy", "bspline"],
)
def test_registration_stages_vmap_over_pairs_like_a_loop_and_jit_like_eager(run):
    fixed, moving = _pairs()
    # Plain SGD, as for register_svf's test: Adam's sqrt(v) turns float re-association
    # differences in flat regions into O(1) update noise.
    batched = jax.vmap(run)(fixed, moving)
    scale = float(jnp.abs(batched).max())
    assert scale > 0.02  # the transforms moved, so the comparison means something
    for i in range(2):
        np.testing.assert_allclose(batched[i], run(fixed[i], moving[i]), atol=1e-2 * scale)
    np.testing.assert_allclose(jax.jit(run)(fixed[0], moving[0]), run(fixed[0], moving[0]), atol=1e-3 * scale)


def test_register_affine_vmaps_over_pairs_like_a_loop_and_jits_like_eager():
    fixed, _ = _pairs(shape=(32, 32))
    moving = jnp.stack([jnp.roll(fixed[0], (2, -1), axis=(0, 1)), jnp.roll(fixed[1], (-1, 2), axis=(0, 1))])

    def run(f, m):
        return register_affine(f, m, kind="affine", shrink=(2, 1), steps=(20, 10), optimizer=optax.sgd(0.5))[0].matrix

    batched = jax.vmap(run)(fixed, moving)
    assert float(jnp.abs(batched - jnp.eye(3)).max()) > 0.1  # the matrices moved
    for i in range(2):
        np.testing.assert_allclose(batched[i], run(fixed[i], moving[i]), atol=2e-3)
    np.testing.assert_allclose(jax.jit(run)(fixed[0], moving[0]), run(fixed[0], moving[0]), atol=1e-4)


def test_mind_ssc_descriptor_under_jit_and_vmap_with_finite_difference_gradients():
    images = jnp.asarray(RNG.random((3, 14, 12)), jnp.float32)
    descriptor = assert_jit_matches(mind_ssc_descriptor, images[0], atol=1e-6)
    assert descriptor.shape == (14, 12, 4)
    # Each voxel's largest entry is exactly 1 (exp(-D/V) over its max over the pairs).
    np.testing.assert_allclose(jnp.max(descriptor, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(mind_ssc_descriptor(3.0 * images[0] + 2.0), descriptor, atol=1e-5)
    assert_vmap_matches_loop(mind_ssc_descriptor, images, atol=1e-6)
    weights = jnp.asarray(RNG.standard_normal((14, 12, 4)))
    assert_grad_matches_fd(lambda x: jnp.sum(weights * mind_ssc_descriptor(x)), images[0], eps=1e-4)


def test_mean_dice_and_surface_under_jit_and_vmap_match_numpy():
    labels = RNG.integers(0, 3, (3, 10, 9))
    other = np.where(RNG.random(labels.shape) < 0.2, 0, labels)

    def numpy_mean_dice(a, b):
        scores = [2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in (1, 2)]
        return np.mean(scores)

    batched = assert_vmap_matches_loop(lambda a, b: metrics.mean_dice(a, b, labels=(1, 2)), jnp.asarray(labels), jnp.asarray(other))
    for a, b, score in zip(labels, other, batched):
        np.testing.assert_allclose(score, numpy_mean_dice(a, b), rtol=1e-6)
    masks = labels > 0
    surfaces = assert_vmap_matches_loop(jax.jit(metrics.surface), jnp.asarray(masks))
    for mask, surface in zip(masks, surfaces):
        eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
        np.testing.assert_array_equal(surface, mask & ~eroded)
