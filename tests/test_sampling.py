import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import sampling
from jaxreg.sampling import MODES, sample, spline_prefilter
from tests.helpers import assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop

SCIPY_MODE = {"constant": "grid-constant", "nearest": "nearest", "wrap": "grid-wrap", "mirror": "mirror", "reflect": "reflect"}
SHAPES = {2: (9, 11), 3: (7, 8, 6)}


def _image(ndim, seed=0, channels=None):
    rng = np.random.default_rng(seed)
    shape = SHAPES[ndim] + ((channels,) if channels else ())
    return rng.standard_normal(shape).astype(np.float32)


def _interior_points(ndim, n=60, seed=1):
    rng = np.random.default_rng(seed)
    hi = np.array(SHAPES[ndim]) - 1
    return (rng.uniform(0.05, 0.95, (n, ndim)) * hi).astype(np.float32)


def _all_points(ndim, n=200, seed=2):
    rng = np.random.default_rng(seed)
    return rng.uniform(-3.0, np.array(SHAPES[ndim]) + 2.0, (n, ndim)).astype(np.float32)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order,tol", [(0, 0.0), (1, 1e-4), (3, 2e-3)])
def test_matches_scipy_on_interior_points(ndim, order, tol):
    image = _image(ndim)
    points = _interior_points(ndim)
    ref = ndi.map_coordinates(image.astype(np.float64), points.T, order=order, mode="mirror")
    out = np.asarray(sample(image, points, order=order, mode="mirror"))
    np.testing.assert_allclose(out, ref, atol=tol + 1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("order", [0, 1])
def test_boundary_modes_match_scipy_everywhere(ndim, mode, order):
    image = _image(ndim)
    points = _all_points(ndim)
    if order == 0:
        # Keep away from rounding ties, where conventions legitimately differ.
        points = np.round(points) + np.float32(0.2)
    ref = ndi.map_coordinates(image.astype(np.float64), points.T, order=order, mode=SCIPY_MODE[mode], cval=0.7)
    out = np.asarray(sample(image, points, order=order, mode=mode, cval=0.7))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_cubic_interpolates_voxel_values_and_prefilter_matches_scipy():
    image = _image(3)
    coeffs = spline_prefilter(image)
    np.testing.assert_allclose(coeffs, ndi.spline_filter(image.astype(np.float64), order=3, mode="mirror"), atol=1e-5)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1).astype(np.float32)
    np.testing.assert_allclose(sample(image, index, order=3, mode="mirror"), image, atol=1e-5)


CUBIC_SHAPES = {1: (13,), 2: (9, 11), 3: (7, 8, 6)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_prefilter_matches_scipy_spline_filter_in_every_mode(ndim, mode):
    image = np.random.default_rng(ndim).standard_normal(CUBIC_SHAPES[ndim]).astype(np.float32)
    expected = ndi.spline_filter(image.astype(np.float64), order=3, mode=SCIPY_MODE[mode])
    # Coefficients grow to 30 in 3-D: float32 rounding, relative to that (3e-7 measured).
    np.testing.assert_allclose(spline_prefilter(image, mode=mode), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_cubic_matches_scipy_near_and_beyond_the_edges(ndim, mode):
    # Points up to 3 voxels past every edge, most of them within reach of the boundary.
    # Before the prefilter honoured the mode, only 'mirror' matched (errors 0.2 to 16 for
    # the others); now each mode is within float32 rounding of scipy's float64 result.
    shape = CUBIC_SHAPES[ndim]
    rng = np.random.default_rng(10 + ndim)
    image = rng.standard_normal(shape).astype(np.float32)
    points = rng.uniform(-3.0, np.array(shape) + 2.0, (300, ndim)).astype(np.float32)
    expected = ndi.map_coordinates(
        image.astype(np.float64), points.T.astype(np.float64), order=3, mode=SCIPY_MODE[mode], cval=0.7, prefilter=True
    )
    got = np.asarray(sample(image, points, order=3, mode=mode, cval=0.7))
    # 'nearest' and 'constant' read coefficients of an image padded by 12 voxels, at
    # coordinates shifted by 12 and so rounded more coarsely in float32 (up to 6e-6 here).
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_cubic_matches_scipy_far_outside_in_float64(mode):
    # In float64 every mode agrees with scipy to the FIR's truncation (about 1e-9), also
    # far past the 12-voxel padding of 'nearest' and 'constant'.
    image = np.random.default_rng(4).standard_normal(17)
    points = np.linspace(-40.0, 56.0, 397)[:, None]
    expected = ndi.map_coordinates(image, points.T, order=3, mode=SCIPY_MODE[mode], cval=0.7)
    with jax.enable_x64(True):
        got = np.asarray(sample(jnp.asarray(image, jnp.float64), jnp.asarray(points, jnp.float64), order=3, mode=mode, cval=0.7))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_channels_last_equals_per_channel(order):
    image = _image(2, channels=3)
    points = _interior_points(2)
    out = sample(image, points, order=order)
    assert out.shape == (60, 3)
    for c in range(3):
        np.testing.assert_allclose(out[:, c], sample(image[..., c], points, order=order), atol=1e-6)


@pytest.mark.parametrize("vector_gathers", [True, False])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["constant", "nearest"])
def test_values_match_scipy_whichever_gathers_read_them(ndim, mode, vector_gathers, monkeypatch):
    # Values alone read one 2**d patch per point or 2**d elements, by image rank, channels
    # and CPU (sampling._values_read_patches); every choice must agree with scipy.
    monkeypatch.setattr(sampling, "_cpu_vector_gathers", lambda: vector_gathers)
    points = _all_points(ndim)
    for channels in (None, ndim):
        image = _image(ndim, channels=channels)
        with jax.disable_jit():  # trace again under the patched CPU
            out = np.asarray(sample(image, points, mode=mode, cval=0.7)).reshape(len(points), -1)
        for c in range(out.shape[1]):
            plane = image if channels is None else image[..., c]
            ref = ndi.map_coordinates(plane.astype(np.float64), points.T, order=1, mode=SCIPY_MODE[mode], cval=0.7)
            np.testing.assert_allclose(out[:, c], ref, atol=1e-5)


def test_cpu_vector_gathers_follow_the_cpu_flags_and_xla_isa_cap(monkeypatch):
    from benchmarks._timing import cpu_description

    try:
        with open("/proc/cpuinfo") as f:
            has_avx512 = cpu_description(f.read())["cpu_isa"] == "avx512f"
    except OSError:
        has_avx512 = False
    try:
        sampling._cpu_vector_gathers.cache_clear()
        monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
        assert sampling._cpu_vector_gathers() is False
        sampling._cpu_vector_gathers.cache_clear()
        monkeypatch.setenv("XLA_FLAGS", "")
        assert sampling._cpu_vector_gathers() is has_avx512
    finally:
        sampling._cpu_vector_gathers.cache_clear()  # the next caller reads the real environment


def test_nearest_keeps_integer_labels_exact():
    labels = np.random.default_rng(0).integers(0, 35, (10, 12, 9)).astype(np.int32)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"), -1).astype(np.float32)
    out = sample(labels, index + 0.3, order=0)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, labels)


def test_leading_shape_of_coords_is_kept():
    image = _image(2)
    coords = np.random.default_rng(0).uniform(0, 8, (4, 5, 6, 2)).astype(np.float32)
    assert sample(image, coords).shape == (4, 5, 6)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_jit(order):
    assert_jit_matches(lambda im, c: sample(im, c, order=order), _image(3), _interior_points(3))


@pytest.mark.parametrize("order", [1, 3])
def test_vmap_over_images_and_coords_equals_loop(order):
    images = np.stack([_image(2, seed=s) for s in range(3)])
    coords = np.stack([_interior_points(2, seed=s) for s in range(3)])
    assert_vmap_matches_loop(lambda im, c: sample(im, c, order=order), images, coords)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("mode", ["constant", "mirror"])
@pytest.mark.parametrize("channels", [None, 3])
def test_gradient_wrt_coords_matches_finite_differences(ndim, order, mode, channels):
    # With channels: a vector field read at displaced points (composition), whose
    # coordinate gradient is written differently in 2-D and 3-D (sampling._directional).
    image = _image(ndim, channels=channels)
    weights = np.arange(1.0, (channels or 1) + 1) if channels else 1.0
    # Points off the integer lattice: linear interpolation has kinks at integers.
    points = np.floor(_all_points(ndim, n=20)) + np.random.default_rng(3).uniform(0.2, 0.8, (20, ndim))
    assert_grad_matches_fd(lambda c: jnp.sum(weights * jnp.sin(sample(image, c, order=order, mode=mode, cval=0.3))), points, eps=1e-4)


@pytest.mark.parametrize("order", [1, 3])
def test_gradient_wrt_image_matches_finite_differences(order):
    points = _all_points(2, n=30)
    assert_grad_matches_fd(lambda im: jnp.sum(sample(im, points, order=order, mode="constant") ** 2), _image(2), eps=1e-4)


def test_forward_mode_equals_reverse_mode():
    image = _image(3)
    points = _interior_points(3, n=10)
    f = lambda c: jnp.sum(sample(image, c) ** 2)
    direction = np.random.default_rng(5).standard_normal(points.shape).astype(np.float32)
    _, forward = jax.jvp(f, (points,), (direction,))
    reverse = jnp.vdot(jax.grad(f)(points), direction)
    np.testing.assert_allclose(forward, reverse, rtol=1e-5)


def test_gradient_wrt_coords_uses_no_scatter():
    image = _image(3)
    points = _interior_points(3)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda c: jnp.sum(sample(image, c))))(points))
    assert "scatter" not in jaxpr
    with_image = str(jax.make_jaxpr(jax.grad(lambda im: jnp.sum(sample(im, points))))(image))
    assert "scatter" in with_image  # the image gradient is the transposed gather


@pytest.mark.parametrize("shape", [(5, 4), (5, 1)])
def test_nearest_mode_gradient_at_and_beyond_the_edges(shape):
    # A ramp 2i + 3j (two channels): the interpolant's slope is (2, 3) on the image, flat
    # beyond it, and on the last voxel the right derivative (flat) as an edge-padded image
    # gives; a one-voxel axis is flat everywhere.
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    image = np.stack([2.0 * i + 3.0 * j, 1.0 - 2.0 * i - 3.0 * j], axis=-1).astype(np.float32)
    last = np.array(shape, np.float32) - 1
    points = np.array([[0.0, 0.0], [1.5, 0.25], last, last - 0.5, [-0.5, 0.5], last + 0.7, [0.3, -2.0]], np.float32)
    points[:, 1] = np.clip(points[:, 1], -2.0, last[1] + 0.7)
    values = sample(image, points, mode="nearest")
    clamped = np.clip(points, 0.0, last)
    np.testing.assert_allclose(values[:, 0], 2.0 * clamped[:, 0] + 3.0 * clamped[:, 1], atol=1e-5)
    grads = jax.jacfwd(lambda c: sample(image, c, mode="nearest")[:, 0])(points)
    grads = np.einsum("ppk->pk", grads)
    inside = (points >= 0.0) & (points < last)
    np.testing.assert_allclose(grads, np.where(inside, [2.0, 3.0], 0.0), atol=1e-5)
    reverse = jax.grad(lambda c: jnp.sum(sample(image, c, mode="nearest")[:, 0]))(points)
    np.testing.assert_allclose(reverse, grads, atol=1e-5)
    assert_jit_matches(lambda c: sample(image, c, mode="nearest"), points)


def test_gradient_inside_constant_region_is_zero_and_finite():
    image = np.ones((6, 7), np.float32)
    points = _interior_points(2, n=5) * 0.5
    grad = jax.grad(lambda c: jnp.sum(sample(image, c, mode="nearest")))(points)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(order=2), "order"),
        (dict(mode="bogus"), "boundary mode"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(_image(2), _interior_points(2), **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="axes"):
        sample(np.zeros((4, 5, 6, 2), np.float32), _interior_points(2))
    with pytest.raises(TypeError, match="floating"):
        sample(_image(2), np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="empty"):
        sample(np.zeros((0, 3), np.float32), _interior_points(2))


@pytest.mark.parametrize("vector_gathers", [True, False])
def test_values_read_patches_for_3d_vector_fields_and_for_2d_without_vector_gathers(vector_gathers, monkeypatch):
    monkeypatch.setattr(sampling, "_cpu_vector_gathers", lambda: vector_gathers)
    read = lambda image_shape, d, order=1, mode="constant": sampling._values_read_patches(  # noqa: E731
        np.zeros(image_shape), np.zeros((4, d)), order, mode)
    assert read((6, 6, 6, 3), 3) and read((6, 6, 6, 2), 3, mode="nearest")
    assert not read((6, 6, 6), 3) and not read((6, 6, 6, 1), 3)
    patches_in_2d = not (jax.default_backend() == "cpu" and vector_gathers)  # a GPU reads patches
    assert read((6, 6), 2) is patches_in_2d and read((6, 6, 2), 2) is patches_in_2d
    assert not read((6, 6, 6, 3), 3, order=3) and not read((6, 6, 6, 3), 3, mode="mirror")



def _squarings(u, mode="nearest"):
    """Three squarings of a scaling and squaring: the field is both the image read and the
    points it is read at, so reverse mode transposes the image tangent's gathers."""
    identity = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=u.dtype) for n in u.shape[:-1]], indexing="ij"), axis=-1)
    # A loop, as Velocity.exp has: reverse mode then keeps every step's residuals.
    return jax.lax.fori_loop(0, 3, lambda _, u: u + sample(u, identity + u, mode=mode), u)


def _squarings_loss(u, mode="nearest"):
    return jnp.mean(_squarings(u, mode) ** 2)


def test_recomputed_tangent_weights_give_the_same_gradient_in_less_memory(monkeypatch):
    # 'mirror': 'nearest' reads of fields take the cell path, which always recomputes.
    # Offsets near 0.15 (doubling to 0.6) keep every read inside one cell, away from the
    # kinks of linear interpolation, so that finite differences are meaningful.
    rng = np.random.default_rng(3)
    field = jnp.asarray(0.15 + 0.02 * rng.normal(size=(2, 13, 11, 9, 3)), jnp.float32)
    mirrored_loss = functools.partial(_squarings_loss, mode="mirror")
    gradient = jax.grad(mirrored_loss)
    programs, gradients = {}, {}
    for threshold, name in ((2**62, "kept"), (1, "recomputed")):
        monkeypatch.setattr(sampling, "_RECOMPUTE_TANGENT_WEIGHTS_POINTS", threshold)
        jax.clear_caches()  # sample's own jit keeps the trace made under the other setting
        programs[name] = jax.jit(gradient).lower(field[0]).compile()
        gradients[name] = np.asarray(programs[name](field[0]))
        batched = np.asarray(jax.jit(jax.vmap(gradient))(field))
        np.testing.assert_allclose(batched[0], gradients[name], rtol=1e-5, atol=1e-9)
        assert_grad_matches_fd(mirrored_loss, field[0], eps=1e-4)
    jax.clear_caches()
    np.testing.assert_allclose(gradients["recomputed"], gradients["kept"], rtol=1e-6, atol=1e-9)
    kept, recomputed = (programs[n].memory_analysis().temp_size_in_bytes for n in ("kept", "recomputed"))
    assert recomputed < 0.8 * kept, (recomputed, kept)


def _nearest_linear_matrix(shape, points):
    """The matrix of a linear 'nearest' read, column by column from scipy (unit images)."""
    columns = []
    for flat in range(int(np.prod(shape))):
        unit = np.zeros(int(np.prod(shape)))
        unit[flat] = 1.0
        columns.append(ndi.map_coordinates(unit.reshape(shape), points.T.astype(np.float64), order=1, mode="nearest"))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("shape", [(5, 4), (4, 3, 5), (5, 1)])
@pytest.mark.parametrize("channels", [None, 3])
def test_image_gradient_of_nearest_reads_is_the_transposed_scipy_matrix(shape, channels):
    # Displacement fields read in 'nearest' mode take the cell path (_read_cell_corners):
    # one cell index and position kept per point, one scatter-add of all corners. Its
    # gradient must be exactly W^T c for scipy's interpolation matrix W, at points inside,
    # on the last voxel, beyond every edge and far outside; an axis of one voxel takes the
    # general path.
    rng = np.random.default_rng(7)
    last = np.array(shape, np.float32) - 1
    points = rng.uniform(-2.5, last + 2.5, (40, len(shape))).astype(np.float32)
    points = np.concatenate([points, last[None], np.zeros((1, len(shape)), np.float32), (last - 0.5)[None]])
    cotangent = rng.standard_normal((len(points),) + ((channels,) if channels else ())).astype(np.float32)
    image = rng.standard_normal(shape + ((channels,) if channels else ())).astype(np.float32)

    def loss(image):
        return jnp.sum(cotangent * sample(image, points, mode="nearest"))

    expected = _nearest_linear_matrix(shape, points).T @ cotangent.reshape(len(points), -1)
    gradient = jax.grad(loss)(image)
    np.testing.assert_allclose(np.asarray(gradient).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(image), gradient, rtol=1e-6, atol=1e-6)
    # Forward mode reads the tangent image through the same cells.
    direction = rng.standard_normal(image.shape).astype(np.float32)
    _, forward = jax.jvp(loss, (image,), (direction,))
    np.testing.assert_allclose(forward, np.vdot(np.asarray(gradient), direction), rtol=1e-4, atol=1e-4)
    program = jax.jit(jax.grad(loss)).lower(image).compile().as_text()
    scatters = len(re.findall(r" scatter\(", program))
    assert scatters == (1 if min(shape) >= 2 else 2 ** len(shape)), scatters


def test_nearest_reads_of_a_field_give_the_same_gradient_under_vmap_and_finite_differences():
    rng = np.random.default_rng(4)
    field = jnp.asarray(0.15 + 0.02 * rng.normal(size=(3, 9, 8, 7, 3)), jnp.float32)
    gradient = jax.grad(_squarings_loss)
    batched = jax.jit(jax.vmap(gradient))(field)
    for pair in range(3):
        np.testing.assert_allclose(batched[pair], gradient(field[pair]), rtol=1e-5, atol=1e-9)
    assert_grad_matches_fd(_squarings_loss, field[0], eps=1e-4)


def test_recomputed_coordinate_gradient_of_a_field_read_where_it_moves(monkeypatch):
    # Below _RECOMPUTE_COORDINATE_GRADIENT_MAX_POINTS a 3-D field read at the points it
    # moves (both differentiated) recomputes its coordinate gradient in the backward pass;
    # above, it keeps it. Same gradient either way, equal to finite differences, forward
    # mode equal to reverse mode, jit and vmap equal to the loop.
    rng = np.random.default_rng(6)
    field = jnp.asarray(0.15 + 0.02 * rng.normal(size=(2, 8, 9, 7, 3)), jnp.float32)
    direction = jnp.asarray(rng.normal(size=field.shape[1:]), jnp.float32)
    gradients = {}
    for threshold, name in ((2**62, "recomputed"), (1, "kept")):
        monkeypatch.setattr(sampling, "_RECOMPUTE_COORDINATE_GRADIENT_MAX_POINTS", threshold)
        jax.clear_caches()
        compiled = jax.jit(jax.grad(_squarings_loss)).lower(field[0]).compile().as_text()
        # Recomputed: the backward pass reads the patches a second time. (XLA GPU splits
        # the gathers its own way: 3 for recomputed on an H200.)
        if jax.default_backend() == "cpu":
            assert len(re.findall(r" gather\(", compiled)) == (2 if name == "recomputed" else 1)
        gradients[name] = np.asarray(jax.jit(jax.grad(_squarings_loss))(field[0]))
        batched = jax.vmap(jax.grad(_squarings_loss))(field)
        np.testing.assert_allclose(batched[0], gradients[name], rtol=1e-5, atol=1e-9)
        _, forward = jax.jvp(_squarings_loss, (field[0],), (direction,))
        np.testing.assert_allclose(forward, np.vdot(gradients[name], direction), rtol=1e-4)
    jax.clear_caches()
    np.testing.assert_allclose(gradients["recomputed"], gradients["kept"], rtol=1e-5, atol=1e-9)
    assert_grad_matches_fd(_squarings_loss, field[0], eps=1e-4)
    monkeypatch.setattr(sampling, "_RECOMPUTE_COORDINATE_GRADIENT_MAX_POINTS", 2**22)
    recomputes = sampling._recomputes_coordinate_gradient
    assert recomputes(field[0], field[0], 1, "nearest")
    assert not recomputes(field[0], field[0], 1, "constant") and not recomputes(field[0], field[0], 3, "nearest")
    assert not recomputes(field[0, ..., 0], field[0], 1, "nearest")  # a scalar image
    assert not recomputes(np.zeros((6, 5, 2)), np.zeros((4, 2)), 1, "nearest")  # 2-D
