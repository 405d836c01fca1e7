import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import metrics, synthetic
from jaxreg.filters import gaussian_smooth
from jaxreg.grid import Grid, Image
from jaxreg.losses import similarity
from jaxreg.sampling import sample
from jaxreg.registration import (
    PRESETS,
    _steps_for,
    cap_step,
    minimize,
    normalize_intensity,
    register,
    register_affine,
    register_bspline,
    register_greedy,
    register_svf,
    register_syn,
    smooth_updates,
)
from jaxreg.transforms import BSpline, Displacement, Velocity
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
    assert float(jnp.abs(round_trip[5:-5, 5:-5]).max()) < 0.15  # a tenth of a voxel: scaling and squaring is discrete


def test_register_svf_vmaps_over_pairs_like_a_loop():
    pairs = [_pair(s, shape=(24, 24)) for s in (3, 4)]
    fixed = jnp.stack([p[0].data for p in pairs])
    moving = jnp.stack([pairs[1][0].data, pairs[0][0].data])
    # Plain SGD: Adam divides by sqrt(v), which turns float re-association differences of
    # the batched program in flat regions (gradients ~1e-9) into O(1) update noise.
    run = lambda f, m: register_svf(f, m, shrink=(1,), steps=(15,), optimizer=optax.sgd(5.0))[0].field
    batched = jax.vmap(run)(fixed, moving)
    scale = float(jnp.abs(batched).max())
    assert scale > 0.05  # the fields moved: the comparison means something
    for i in range(2):
        # batched and single smoothing products sum in different orders: float32 noise
        np.testing.assert_allclose(batched[i], run(fixed[i], moving[i]), atol=1e-2 * scale)


def test_register_chains_affine_and_svf():
    fixed, fixed_labels = _pair(5)
    shift = Affine.from_params(jnp.array([3.0, -2.0]), kind="translation", ndim=2)
    moving = warp(fixed, shift)
    result = register(
        fixed,
        moving,
        affine="translation",
        deformable="svf",
        affine_options=dict(shrink=(2, 1), steps=(80, 40), learning_rate=0.02),
        deformable_options=dict(shrink=(1,), steps=(20,)),
    )
    assert len(result.losses) == 3
    assert float(jnp.mean((result.warped.data - fixed.data) ** 2)) < 0.2 * float(jnp.mean((moving.data - fixed.data) ** 2))
    points = fixed.grid.points()
    np.testing.assert_allclose(result.inverse(result.transform(points))[8:-8, 8:-8], points[8:-8, 8:-8], atol=0.05)


def test_register_with_a_bspline_stage_warps_and_inverts_through_the_separable_spline():
    # register() warps and inverts a B-spline stage by sampling it separably on the fixed
    # grid: the result must be what the per-point spline gives.
    fixed, _, moving, _ = _warped_pair(21)
    result = register(fixed, moving, affine="translation", deformable="bspline",
                      affine_options=dict(shrink=(1,), steps=(10,)), deformable_options=dict(shrink=(2, 1), steps=(40, 30)))
    spline = result.transform.transforms[-1]
    assert isinstance(spline, BSpline) and float(jnp.abs(spline.coefficients).max()) > 0.5
    points = fixed.grid.points()
    mapped = result.transform(points)  # per point: 4^d taps
    expected = sample(moving.data, moving.grid.world_to_index(mapped), order=1)
    np.testing.assert_allclose(result.warped.data, expected, atol=1e-4)
    # The inverse is that of the spline sampled on the grid: 0.063 voxels at worst here
    # (0.041 for the per-point spline's), from up to 4 voxels of displacement.
    round_trip = jnp.abs(result.inverse(mapped) - points)[6:-6, 6:-6]
    assert float(jnp.abs(spline.mapped_points(fixed.grid) - points).max()) > 2.0
    assert float(round_trip.max()) < 0.08 and float(jnp.median(round_trip)) < 0.015, (float(round_trip.max()), float(jnp.median(round_trip)))


def test_bad_arguments_are_named():
    fixed, _ = _pair(0, shape=(16, 16))
    with pytest.raises(ValueError, match="same rank"):
        register(fixed, Image(jnp.zeros((8, 8, 8))))
    with pytest.raises(ValueError, match="shrink"):
        register_svf(fixed, fixed, shrink=(0,))
    with pytest.raises(ValueError, match="per level"):
        register_svf(fixed, fixed, shrink=(2, 1), steps=(5,))
    with pytest.raises(ValueError, match="deformable must be one of"):
        register(fixed, fixed, deformable="demons")
    with pytest.raises(ValueError, match="unknown preset"):
        register(fixed, fixed, preset="lungs")
    with pytest.raises(ValueError, match="unknown similarity"):
        register(fixed, fixed, similarity="nope")
    with pytest.raises(ValueError, match="nothing to do"):
        register(fixed, fixed, affine=None, deformable=None)
    with pytest.raises(ValueError, match="empty"):
        register_svf(fixed, fixed, fixed_mask=jnp.zeros((16, 16)))
    with pytest.raises(ValueError, match="fixed_mask has shape"):
        register_svf(fixed, fixed, fixed_mask=jnp.ones((8, 8)))
    with pytest.raises(ValueError, match="landmarks"):
        register_affine(fixed, fixed, landmarks=(jnp.zeros((3, 2)), jnp.zeros((4, 2))))
    with pytest.raises(ValueError, match="tolerance"):
        minimize(lambda p: p**2, 1.0, optax.sgd(0.1), steps=5, tolerance=-1.0)


def test_minimize_stops_when_converged_and_pads_the_history_with_nan():
    energy = lambda p: jnp.sum((p - 3.0) ** 2)
    run = jax.jit(lambda p: minimize(energy, p, optax.sgd(0.2), steps=500, tolerance=1e-4, window=5))
    params, history = run(jnp.zeros(2))
    done = int(jnp.sum(jnp.isfinite(history)))
    assert 10 <= done < 100, done  # geometric convergence: far fewer than 500 steps
    assert bool(jnp.all(jnp.isnan(history[done:])))
    np.testing.assert_allclose(params, [3.0, 3.0], atol=1e-2)
    # Under vmap each problem stops on its own: the batched loop gives each its own answer.
    batched, _ = jax.vmap(run)(jnp.array([[0.0, 0.0], [2.9, 3.1]]))
    np.testing.assert_allclose(batched[0], params, atol=1e-6)


def _warped_pair(seed, amplitude=4.0, shape=(48, 48)):
    fixed, fixed_labels = _pair(seed, shape)
    truth = synthetic.random_velocity(jax.random.PRNGKey(seed + 100), fixed.grid, amplitude=amplitude, smoothness=14.0)
    moving = warp(fixed, truth)
    moving_labels = warp(Image(fixed_labels, fixed.affine), truth, order=0).data
    return fixed, fixed_labels, moving, moving_labels


def _dice_gain(transform, fixed, fixed_labels, moving_labels):
    warped_labels = warp(Image(moving_labels, fixed.affine), transform, fixed.grid, order=0).data
    before = float(metrics.mean_dice(moving_labels, fixed_labels, labels=LABELS))
    after = float(metrics.mean_dice(warped_labels, fixed_labels, labels=LABELS))
    return before, after


@pytest.mark.parametrize("stage", [register_syn, register_greedy, register_bspline])
def test_deformable_stages_improve_dice_without_folding(stage):
    fixed, fixed_labels, moving, moving_labels = _warped_pair(11)
    transform, losses = stage(fixed, moving, shrink=(2, 1), steps=(60, 40))
    before, after = _dice_gain(transform, fixed, fixed_labels, moving_labels)
    assert after > before + 0.05, (stage.__name__, before, after)
    det = jacobian_determinant(transform, fixed.grid)
    assert float(jnp.mean(det <= 0)) < 1e-3
    assert float(losses[-1][-1]) < float(losses[0][0])
    expected = {register_syn: Velocity, register_greedy: Displacement, register_bspline: BSpline}[stage]
    assert isinstance(transform, expected)


def test_syn_is_symmetric_swapping_the_images_negates_the_velocity():
    # sim(m o exp(v/2), f o exp(-v/2)) with a symmetric similarity is the same energy as
    # the swapped problem at -v, and Adam and smoothing commute with the sign flip.
    fixed, _, moving, _ = _warped_pair(12)
    forward, _ = register_syn(fixed, moving, shrink=(2, 1), steps=(30, 20), similarity_loss="mse")
    backward, _ = register_syn(moving, fixed, shrink=(2, 1), steps=(30, 20), similarity_loss="mse")
    scale = float(jnp.abs(forward.field).max())
    assert scale > 0.5
    np.testing.assert_allclose(backward.field, -forward.field, atol=1e-2 * scale)
    # and the inverse is exact: exp(v) o exp(-v) = id
    points = fixed.grid.points()
    round_trip = forward(forward.inverse()(points))
    assert float(jnp.abs(round_trip - points)[6:-6, 6:-6].max()) < 0.05


def test_syn_with_a_fixed_mask_gives_finite_losses_that_decrease():
    # SyN is the stage that warps the mask (by exp(-v/2)); with a binary mask the LNCC
    # windows in the masked-out region had no weight and their 1/max(0, tiny) gave a NaN
    # gradient: the first step turned the velocity, and every loss after it, into NaN.
    fixed, fixed_labels, moving, moving_labels = _warped_pair(18)
    mask = jnp.zeros(fixed.shape).at[:, :30].set(1.0)
    lncc = similarity.lncc(radius=2)
    velocity, losses = register_syn(fixed, moving, shrink=(2, 1), steps=(40, 30), fixed_mask=mask, similarity_loss=lncc)
    for history in losses:
        assert np.all(np.isfinite(history))
        assert float(history[-1]) < float(history[0]) - 0.01, history
    assert np.all(np.isfinite(velocity.field))
    before, after = _dice_gain(velocity, fixed, fixed_labels, moving_labels)
    assert after > before + 0.03, (before, after)
    # The first energy is the masked LNCC of the pair as given (v = 0 warps nothing).
    _, first = register_syn(fixed, moving, shrink=(1,), steps=(1,), fixed_mask=mask, similarity_loss=lncc)
    np.testing.assert_allclose(first[0][0], lncc(moving.data, fixed.data, mask=mask), rtol=1e-5)


def test_greedy_recovers_a_translation_by_composition():
    fixed, _ = _pair(13)
    shift = jnp.array([2.0, -1.5])  # mm, on 1.5 mm voxels
    moving = warp(fixed, Affine.from_params(-shift, kind="translation", ndim=2))
    field, _ = register_greedy(fixed, moving, shrink=(2, 1), steps=(80, 40), similarity_loss="mse", learning_rate=0.2)
    interior = field.field[10:-10, 10:-10]
    # moving(x) = fixed(x - shift), so moving(x + shift) = fixed(x): the field is +shift
    np.testing.assert_allclose(jnp.median(interior.reshape(-1, 2), axis=0), shift, atol=0.3)


def test_mask_and_landmarks_enter_the_energy_exactly():
    fixed, _, moving, _ = _warped_pair(14)
    mask = jnp.zeros(fixed.shape).at[:, :24].set(1.0)
    lncc = similarity.lncc(radius=2)
    _, losses = register_svf(fixed, moving, shrink=(1,), steps=(1,), fixed_mask=mask, similarity_loss=lncc)
    # The same masked LNCC, summed in another order (one compiled level program against
    # op-by-op calls): float32 roundoff of about 1e-5 of the value.
    np.testing.assert_allclose(losses[0][0], lncc(moving.data, fixed.data, mask=mask), rtol=5e-5)
    fixed_points = jnp.array([[10.0, 12.0], [30.0, 40.0], [50.0, 20.0]])
    moving_points = fixed_points + jnp.array([2.0, -1.0])
    _, plain = register_affine(fixed, moving, shrink=(1,), steps=(1,))
    _, with_landmarks = register_affine(
        fixed, moving, shrink=(1,), steps=(1,), landmarks=(fixed_points, moving_points), landmark_weight=0.5
    )
    np.testing.assert_allclose(with_landmarks[0][0] - plain[0][0], 0.5 * 5.0, rtol=1e-4)


def test_landmarks_pull_an_affine_registration():
    fixed, _ = _pair(15)
    truth = Affine.from_params(jnp.array([3.0, -2.0]), kind="translation", ndim=2)
    fixed_points = jnp.array([[10.0, 12.0], [30.0, 40.0], [50.0, 20.0], [20.0, 55.0]])
    moving = fixed  # the images say "identity"; only the landmarks say "shift"
    found, _ = register_affine(
        fixed, moving, kind="translation", shrink=(1,), steps=(200,), learning_rate=0.02,
        landmarks=(fixed_points, truth(fixed_points)), landmark_weight=10.0,
    )
    np.testing.assert_allclose(found(fixed_points), truth(fixed_points), atol=0.3)


def test_register_reports_stages_and_timings_and_presets_resolve_steps():
    fixed, fixed_labels, moving, moving_labels = _warped_pair(16, shape=(32, 32))
    result = register(fixed, moving, preset="fast", shrink=(2, 1))
    assert result.stages == ("affine@4", "svf@2", "svf@1")
    assert result.compile_seconds > 0 and result.run_seconds > 0
    assert len(result.losses) == 3
    assert _steps_for((2, 1), (4, 2), (80, 40)) == (40, 40)
    assert _steps_for((8, 4), (4, 2, 1), (100, 60, 30)) == (100, 100)
    assert set(PRESETS) >= {"brain-mri", "brain-mri-fine", "fast", "ct", "multimodal", "rigid", "affine"}
    # traced: nothing to time
    traced = jax.jit(lambda f, m: register(Image(f, fixed.affine), Image(m, fixed.affine), preset="fast", shrink=(1,)).warped.data)
    assert traced(fixed.data, moving.data).shape == fixed.shape


def test_vmap_of_register_equals_a_loop_over_pairs():
    # Result keeps its stage names as static pytree data, so it can leave jax.vmap.
    pairs = [_warped_pair(seed, shape=(32, 32)) for seed in (20, 21)]
    affine = pairs[0][0].affine
    fixed = jnp.stack([p[0].data for p in pairs])
    moving = jnp.stack([p[2].data for p in pairs])
    # Plain SGD: Adam divides by sqrt(v) and turns float re-association differences of the
    # batched program in flat regions into visible update noise (with Adam: 0.014 mm).
    options = dict(
        affine_options=dict(optimizer=optax.sgd(0.05)), deformable_options=dict(optimizer=optax.sgd(5.0))
    )

    def run(f, m):
        return register(Image(f, affine), Image(m, affine), preset="fast", shrink=(2, 1), **options)

    batched = jax.vmap(run)(fixed, moving)
    assert batched.stages == ("affine@4", "svf@2", "svf@1")
    assert batched.compile_seconds is None and batched.run_seconds is None  # traced
    assert batched.warped.data.shape == (2, 32, 32) and [h.shape for h in batched.losses] == [(2, 80), (2, 40), (2, 40)]
    for i, (fixed_image, *_) in enumerate(pairs):
        single = run(fixed[i], moving[i])
        one = jax.tree_util.tree_map(lambda x: x[i], batched)
        assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(single._replace(compile_seconds=None, run_seconds=None))
        points = fixed_image.grid.points()
        moved = float(jnp.abs(single.transform(points) - points).max())
        assert moved > 1.0  # mm: the comparison means something
        np.testing.assert_allclose(one.transform(points), single.transform(points), rtol=0, atol=1e-4 * moved)
        np.testing.assert_allclose(one.warped.data, single.warped.data, rtol=0, atol=1e-4)
        # A level this small runs on its own compiled with XLA CPU's older emitters
        # (jaxreg._programs.FAST_COMPILE_VOXELS), batched with the newer: other roundings.
        for got, expected in zip(one.losses, single.losses):
            np.testing.assert_allclose(got, expected, rtol=5e-4, atol=1e-6)


def test_fine_brain_preset_adds_a_full_resolution_level_that_registers_closer():
    # 64^2 keeps every level (none coarser than 16 voxels). Measured: Dice 0.929 -> 0.968 and
    # mean |warped - fixed| 0.0053 -> 0.0020 with the full-resolution level.
    fixed, fixed_labels, moving, moving_labels = _warped_pair(30, amplitude=5.0, shape=(64, 64))
    default = register(fixed, moving, preset="brain-mri")
    fine = register(fixed, moving, preset="brain-mri-fine")
    assert default.stages == ("affine@4", "affine@2", "greedy@4", "greedy@2")
    assert fine.stages == default.stages + ("greedy@1",)
    brain, brain_fine = PRESETS["brain-mri"], PRESETS["brain-mri-fine"]
    assert brain_fine["affine_options"] == brain["affine_options"]  # only the deformable stage differs
    assert {k: v for k, v in brain_fine["deformable_options"].items() if k not in ("shrink", "steps")} == {
        k: v for k, v in brain["deformable_options"].items() if k not in ("shrink", "steps")}
    _, dice_default = _dice_gain(default.transform, fixed, fixed_labels, moving_labels)
    _, dice_fine = _dice_gain(fine.transform, fixed, fixed_labels, moving_labels)
    assert dice_fine > dice_default + 0.02, (dice_default, dice_fine)
    residual = lambda result: float(jnp.mean(jnp.abs(result.warped.data - fixed.data)))  # noqa: E731
    assert residual(fine) < 0.6 * residual(default)
    assert float(jnp.mean(jacobian_determinant(fine.transform, fixed.grid) <= 0)) == 0.0


def test_rigid_preset_has_no_deformable_stage():
    fixed, _ = _pair(17, shape=(32, 32))
    result = register(fixed, fixed, preset="rigid", shrink=(1,), steps=(5,))
    assert result.stages == ("rigid@1",)
    assert isinstance(result.transform, Affine)


def test_register_is_blind_to_the_intensity_scale_and_normalize_intensity_matches_numpy():
    fixed, _, moving, _ = _warped_pair(18, shape=(32, 32))
    scaled = lambda image: Image(3000.0 * image.data + 100.0, image.affine)
    options = dict(preset="fast", shrink=(2, 1), steps=(20, 10), affine_options=dict(steps=(10,)))
    plain = register(fixed, moving, **options)
    raw = register(scaled(fixed), scaled(moving), **options)
    points = fixed.grid.points()
    np.testing.assert_allclose(raw.transform(points), plain.transform(points), atol=0.05)
    # warped is the moving image as given, on its own scale
    inner = (slice(6, -6), slice(6, -6))
    np.testing.assert_allclose(raw.warped.data[inner], 3000.0 * plain.warped.data[inner] + 100.0, rtol=1e-3, atol=5.0)
    data = np.asarray(moving.data)
    lo, hi = np.percentile(data, [0.5, 99.5])
    np.testing.assert_allclose(normalize_intensity(moving).data, np.clip((data - lo) / (hi - lo), 0, 1), atol=1e-5)
    # traced (jit, vmap) the percentiles come from jnp instead of numpy: the same numbers
    traced = jax.jit(normalize_intensity)(moving).data
    np.testing.assert_allclose(traced, normalize_intensity(moving).data, atol=1e-6)


def test_register_downsamples_each_image_once_per_factor_for_both_stages(monkeypatch):
    from jaxreg import registration

    fixed, _, moving, _ = _warped_pair(19, shape=(40, 40))
    factors = []
    shrink = registration._shrunk
    monkeypatch.setattr(registration, "_shrunk", lambda image, f: (factors.append(f), shrink(image, f))[1])
    result = register(fixed, moving, shrink=(2, 1), steps=(3, 2), affine_options=dict(shrink=(2, 1), steps=(3, 2)))
    assert result.stages == ("affine@2", "affine@1", "greedy@2", "greedy@1")
    assert sorted(factors) == [2, 2]  # fixed and moving at factor 2, shared by the two stages


def test_preset_pyramids_shrink_to_fit_small_images():
    from jaxreg.registration import _fit_to_image

    assert _fit_to_image(dict(shrink=(4, 2, 1), steps=(9, 8, 7)), (32, 40)) == dict(shrink=(2, 1), steps=(8, 7))
    assert _fit_to_image(dict(shrink=(4, 2)), (20, 20)) == dict(shrink=(2,))  # the finest level stays
    assert _fit_to_image(dict(shrink=(4, 2), steps=(5, 6)), (160, 192, 224)) == dict(shrink=(4, 2), steps=(5, 6))


def test_minimize_runs_lbfgs_with_its_line_search():
    # An ill-conditioned quadratic: L-BFGS solves it in a few steps, Adam does not.
    scales = jnp.array([1.0, 30.0, 300.0])
    target = jnp.array([1.0, -2.0, 0.5])
    energy = lambda p: jnp.sum(scales * (p - target) ** 2)
    lbfgs, lbfgs_history = jax.jit(lambda p: minimize(energy, p, optax.lbfgs(), steps=15))(jnp.zeros(3))
    adam, _ = jax.jit(lambda p: minimize(energy, p, optax.adam(0.05), steps=15))(jnp.zeros(3))
    np.testing.assert_allclose(lbfgs, target, atol=5e-3)  # float32 on a condition number of 300
    assert float(energy(adam)) > 100 * float(energy(lbfgs)) + 1e-6
    assert float(lbfgs_history[0]) > float(lbfgs_history[-1])
    # and on a registration stage (affine parameters)
    fixed, _ = _pair(19, shape=(32, 32))
    truth = Affine.from_params(jnp.array([1.5, -1.0]), kind="translation", ndim=2)
    found, _ = register_affine(fixed, warp(fixed, truth), kind="translation", shrink=(1,), steps=(20,), optimizer=optax.lbfgs())
    # moving(x) = fixed(x + t), so moving(x - t) = fixed(x)
    np.testing.assert_allclose(found.translation, -truth.translation, atol=0.1)
