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
