import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import metrics, synthetic
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Grid, Image
from jaxreg.registration import cap_step, minimize, register, register_affine, register_svf, smooth_updates
from jaxreg.transforms import Affine, compose, jacobian_determinant, warp

LABELS = (1, 2, 3, 4)


def test_minimize_finds_the_minimum_of_a_quadratic_in_one_program():
    target = jnp.array([1.0, -2.0, 3.0])
    energy = lambda p: jnp.sum((p - target) ** 2)
    params, history = jax.jit(lambda p: minimize(energy, p, optax.adam(0.1), steps=300))(jnp.zeros(3))
    np.testing.assert_allclose(params, target, atol=1e-2)
    assert history.shape == (300,) and float(history[-1]) < 1e-3 < float(history[0])


def test_smooth_updates_smooths_fields_and_leaves_vectors_alone():
    field = jnp.asarray(np.random.default_rng(0).standard_normal((12, 10, 2)), jnp.float32)
    vector = jnp.arange(3.0)
    (smoothed, passed), _ = smooth_updates(1.5).update((field, vector), optax.EmptyState())
    np.testing.assert_allclose(smoothed, gaussian_smooth(field, 1.5, ndim=2), atol=1e-6)
    np.testing.assert_array_equal(passed, vector)


def test_cap_step_bounds_each_voxel_and_keeps_small_steps():
    field = jnp.zeros((6, 5, 2)).at[2, 3].set(jnp.array([3.0, 4.0])).at[1, 1].set(jnp.array([0.1, 0.0]))
    capped, _ = cap_step(1.0).update(field, optax.EmptyState())
    np.testing.assert_allclose(capped[2, 3], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(capped[1, 1], [0.1, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        cap_step(0.0)


def _pair(seed, shape=(48, 48)):
    image, labels = synthetic.blobs(jax.random.PRNGKey(seed), shape)
    return Image(image, Grid.from_spacing(shape, spacing=1.5).affine), labels


def test_register_affine_recovers_a_known_affine():
    fixed, _ = _pair(0)
    truth = Affine.from_params(jnp.array([0.08, 0.06, 2.0, -3.0]), kind="similarity", ndim=2, center=jnp.array([35.0, 35.0]))
    moving = warp(fixed, truth.inverse())  # so that moving o truth = fixed
    found, losses = register_affine(fixed, moving, kind="similarity", shrink=(2, 1), steps=(150, 100), learning_rate=0.02)
    points = fixed.grid.points()
    error = jnp.linalg.norm(found(points) - truth(points), axis=-1)
    assert float(error.max()) < 0.5  # mm, on 1.5 mm voxels
    assert float(losses[-1][-1]) < float(losses[0][0])


def test_register_svf_improves_dice_without_folding_and_has_an_exact_inverse():
    fixed, fixed_labels = _pair(1)
    truth = synthetic.random_velocity(jax.random.PRNGKey(2), fixed.grid, amplitude=4.0, smoothness=14.0)
    moving = warp(fixed, truth)
    moving_labels = warp(Image(fixed_labels, fixed.affine), truth, order=0).data
    velocity, losses = register_svf(fixed, moving, shrink=(2, 1), steps=(60, 40), regularization=0.5)
    warped_labels = warp(Image(moving_labels, fixed.affine), velocity, order=0).data
    before = float(metrics.mean_dice(moving_labels, fixed_labels, labels=LABELS))
    after = float(metrics.mean_dice(warped_labels, fixed_labels, labels=LABELS))
    assert after > before + 0.05, (before, after)
    assert float(jnp.min(jacobian_determinant(velocity, fixed.grid))) > 0
    round_trip = compose(velocity, velocity.inverse()).mapped_points(fixed.grid) - fixed.grid.points()
    assert float(jnp.abs(round_trip[5:-5, 5:-5]).max()) < 0.1


def test_register_svf_vmaps_over_pairs_like_a_loop():
    pairs = [_pair(s, shape=(24, 24)) for s in (3, 4)]
    fixed = jnp.stack([p[0].data for p in pairs])
    moving = jnp.stack([pairs[1][0].data, pairs[0][0].data])
    # Plain SGD: Adam divides by sqrt(v), which turns float re-association differences of
    # the batched program in flat regions (gradients ~1e-9) into O(1) update noise.
    run = lambda f, m: register_svf(f, m, shrink=(1,), steps=(15,), optimizer=optax.sgd(5.0))[0].field
    batched = jax.vmap(run)(fixed, moving)
    assert float(jnp.abs(batched).max()) > 0.05  # the fields moved: the comparison means something
    for i in range(2):
        np.testing.assert_allclose(batched[i], run(fixed[i], moving[i]), atol=1e-4)


def test_register_chains_affine_and_svf():
    fixed, fixed_labels = _pair(5)
    shift = Affine.from_params(jnp.array([3.0, -2.0]), kind="translation", ndim=2)
    moving = warp(fixed, shift)
    result = register(
        fixed,
        moving,
        affine="translation",
        affine_options=dict(shrink=(2, 1), steps=(80, 40), learning_rate=0.02),
        deformable_options=dict(shrink=(1,), steps=(20,)),
    )
    assert len(result.losses) == 3
    assert float(jnp.mean((result.warped.data - fixed.data) ** 2)) < 0.2 * float(jnp.mean((moving.data - fixed.data) ** 2))
    points = fixed.grid.points()
    np.testing.assert_allclose(result.inverse(result.transform(points))[8:-8, 8:-8], points[8:-8, 8:-8], atol=0.05)


def test_bad_arguments_are_named():
    fixed, _ = _pair(0, shape=(16, 16))
    with pytest.raises(ValueError, match="same rank"):
        register(fixed, Image(jnp.zeros((8, 8, 8))))
    with pytest.raises(ValueError, match="shrink"):
        register_svf(fixed, fixed, shrink=(0,))
    with pytest.raises(ValueError, match="per level"):
        register_svf(fixed, fixed, shrink=(2, 1), steps=(5,))
    with pytest.raises(ValueError, match="not built yet"):
        register(fixed, fixed, deformable="syn")
