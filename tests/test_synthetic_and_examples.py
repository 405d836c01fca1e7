import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import synthetic
from jaxreg.grid import Grid
from jaxreg.transforms import jacobian_determinant

ROOT = Path(__file__).resolve().parents[1]


def test_blobs_have_every_label_and_intensities_in_range():
    for shape in [(40, 36), (20, 18, 16)]:
        image, labels = synthetic.blobs(jax.random.PRNGKey(0), shape, labels=4)
        assert image.shape == labels.shape == shape
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert set(np.unique(np.asarray(labels)).tolist()) == {0, 1, 2, 3, 4}


def test_blobs_are_deterministic_for_a_key():
    a = synthetic.blobs(jax.random.PRNGKey(3), (24, 24))[0]
    b = synthetic.blobs(jax.random.PRNGKey(3), (24, 24))[0]
    np.testing.assert_array_equal(a, b)


def test_random_velocity_has_the_requested_amplitude_and_is_diffeomorphic():
    grid = Grid((48, 40))
    v = synthetic.random_velocity(jax.random.PRNGKey(1), grid, amplitude=3.0, smoothness=12.0)
    np.testing.assert_allclose(float(jnp.abs(v.field).max()), 3.0, rtol=1e-5)
    # Large where it matters: the centre moves, not only the border.
    centre = v.field[12:-12, 10:-10]
    assert float(jnp.abs(centre).max()) > 1.0
    assert float(jacobian_determinant(v, grid).min()) > 0.0


def test_random_velocity_is_cubic_upsampled_noise_as_sample_reads_it():
    """The separable construction equals sample(noise, ..., order=3, mode='mirror') at the
    grid's points, also under jit and vmap."""
    from jaxreg.sampling import sample

    for shape, smoothness in [((40, 30, 20), 4.0), ((28, 33), 6.0)]:
        grid = Grid(shape)
        key = jax.random.PRNGKey(4)
        coarse = tuple(max(2, int(round((n - 1) / smoothness)) + 1) for n in shape)
        noise = jax.random.normal(key, coarse + (len(shape),))
        scale = jnp.asarray([(c - 1) / (n - 1) for c, n in zip(coarse, shape)], jnp.float32)
        reference = np.asarray(sample(noise, grid.index_points() * scale, order=3, mode="mirror"))
        reference = 2.5 * reference / np.abs(reference).max()
        draw = lambda k: synthetic.random_velocity(k, grid, amplitude=2.5, smoothness=smoothness).field  # noqa: E731
        np.testing.assert_allclose(draw(key), reference, atol=1e-5)
        np.testing.assert_allclose(jax.jit(draw)(key), reference, atol=1e-5)
        batched = jax.vmap(draw)(jnp.stack([key, jax.random.PRNGKey(5)]))
        np.testing.assert_allclose(batched[0], reference, atol=1e-5)
        assert float(jnp.abs(batched[1] - batched[0]).max()) > 0.1


def test_quickstart_registers_the_synthetic_pair(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    result = quickstart.main(["--size", "48", "--steps", "60", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == result
    assert result["loss_last"] < 0.6 * result["loss_first"]
    assert result["dice_after"] > result["dice_before"] + 0.03
    assert result["negative_jacobian_fraction"] == 0.0


def test_gradicon_3d_scores_a_known_warp():
    """The 3-D example's scoring (shared by its icon_registration peer): labels shifted by
    two voxels along axis 0 are matched exactly by the displacement (2, 0, 0), not by zero."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import gradicon_3d
    finally:
        sys.path.pop(0)
    image, labels = synthetic.blobs(jax.random.key(3), (16, 16, 16), labels=4)
    moving_labels = jnp.roll(labels, 2, axis=0)  # moving(x + 2 e0) = fixed(x)
    batch = {"moving": jnp.roll(image, 2, axis=0)[None].repeat(2, 0), "fixed": image[None].repeat(2, 0),
             "moving_labels": moving_labels[None].repeat(2, 0), "fixed_labels": labels[None].repeat(2, 0)}
    assert int(labels[:2].max()) == 0 and int(labels[-2:].max()) == 0  # nothing wraps round the edge
    shift = jnp.zeros((2, 16, 16, 16, 3)).at[..., 0].set(2.0)
    matched = gradicon_3d.score_synthetic(batch, shift)
    unmatched = gradicon_3d.score_synthetic(batch, jnp.zeros_like(shift))
    assert matched["pairs"] == 2 and matched["dice_after"] == 1.0 and matched["folded_fraction"] == 0.0
    assert unmatched["dice_after"] == unmatched["dice_before"] == matched["dice_before"] < 0.95
    folded = shift.at[:, 8, ..., 0].set(-3.0)  # one slab pulled back past its neighbours
    assert gradicon_3d.score_synthetic(batch, folded)["folded_fraction"] > 0.0
