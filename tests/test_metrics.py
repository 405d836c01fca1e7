import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from helpers import assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop
from jaxreg import metrics as M
from jaxreg.grid import Grid, precise_matmul

SHAPES = {2: (24, 20), 3: (12, 10, 8)}
SPACINGS = {2: (1.5, 0.7), 3: (2.0, 1.0, 0.6)}
LABELS = (1, 2, 3, 5)


def random_labels(shape, seed, n=4):
    # Smoothed noise binned into labels: blobs, not salt-and-pepper.
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    edges = np.quantile(field, np.linspace(0, 1, n + 1)[1:-1])
    return np.asarray([0, 1, 2, 3])[np.digitize(field, edges)].astype(np.int32)


def random_blob(shape, seed, fraction=0.35):
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    return field > np.quantile(field, 1 - fraction)


def numpy_dice(a, b, labels):
    out = []
    for l in labels:
        x, y = a == l, b == l
        total = x.sum() + y.sum()
        out.append(2 * (x & y).sum() / total if total else np.nan)
    return np.asarray(out)


def numpy_hausdorff(a, b, percentile, spacing):
    structure = ndi.generate_binary_structure(a.ndim, 1)
    sa = a & ~ndi.binary_erosion(a, structure, border_value=0)
    sb = b & ~ndi.binary_erosion(b, structure, border_value=0)
    to_b = ndi.distance_transform_edt(~sb, sampling=spacing)[sa]
    to_a = ndi.distance_transform_edt(~sa, sampling=spacing)[sb]
    return max(np.percentile(to_b, percentile), np.percentile(to_a, percentile))


# -- Dice ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_against_numpy(ndim):
    a = random_labels(SHAPES[ndim], 0)
    b = random_labels(SHAPES[ndim], 1)
    got = assert_jit_matches(lambda x, y: M.dice(x, y, labels=LABELS), a, b)
    assert got.shape == (len(LABELS),) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, numpy_dice(a, b, LABELS), rtol=1e-6)  # label 5: NaN in both
    np.testing.assert_allclose(M.mean_dice(a, b, labels=LABELS), np.nanmean(numpy_dice(a, b, LABELS)), rtol=1e-6)


def test_dice_with_itself():
    a = random_labels(SHAPES[2], 2)
    got = np.asarray(M.dice(a, a, labels=LABELS))
    np.testing.assert_array_equal(got[:3], 1.0)
    assert np.isnan(got[3])  # absent from both
    assert float(M.mean_dice(a, a, labels=LABELS)) == 1.0
    assert np.isnan(float(M.mean_dice(a, a, labels=(7, 8))))
    # Present in one map only: 0, not NaN.
    np.testing.assert_array_equal(M.dice(a, np.zeros_like(a), labels=(1,)), [0.0])


def test_dice_vmap_and_errors():
    a = np.stack([random_labels(SHAPES[2], s) for s in range(3)])
    b = np.stack([random_labels(SHAPES[2], s + 10) for s in range(3)])
    assert_vmap_matches_loop(jax.jit(lambda x, y: M.dice(x, y, labels=LABELS)), a, b)
    with pytest.raises(ValueError, match="same shape"):
        M.dice(a[0], a[0].T, labels=LABELS)
    with pytest.raises(ValueError, match="at least one"):
        M.dice(a[0], a[0], labels=())
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda x, l: M.dice(x, x, labels=l))(a[0], jnp.arange(3))


@pytest.mark.parametrize("ndim", [2, 3])
def test_soft_dice(ndim):
    a = random_labels(SHAPES[ndim], 3)
    b = random_labels(SHAPES[ndim], 4)
    labels = (0, 1, 2, 3)
    one_hot = lambda x: jax.nn.one_hot(x, 4)
    np.testing.assert_allclose(M.soft_dice(one_hot(a), one_hot(b)), M.dice(a, b, labels=labels), rtol=1e-5)
    # Mask weights restrict the sums to a region.
    region = np.zeros(SHAPES[ndim], bool)
    region[: SHAPES[ndim][0] // 2] = True
    np.testing.assert_allclose(
        M.soft_dice(one_hot(a), one_hot(b), mask=region),
        numpy_dice(np.where(region, a, -1), np.where(region, b, -1), labels),
        rtol=1e-5,
    )
    # Absent in both: scores 1, finite.
    np.testing.assert_allclose(M.soft_dice(jnp.zeros((4, 3, 2)), jnp.zeros((4, 3, 2))), 1.0)


def test_soft_dice_jit_vmap_grad():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6, 5, 3))
    target = np.asarray(jax.nn.softmax(rng.normal(size=(3, 6, 5, 3)) * 3, axis=-1), np.float32)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)
    f = lambda p, t: M.soft_dice(p, t)
    assert_jit_matches(f, probs[0], target[0])
    assert_vmap_matches_loop(jax.jit(f), probs, target)
    loss = jax.jit(lambda z: 1.0 - jnp.mean(M.soft_dice(jax.nn.softmax(z, axis=-1), target[0])))
    assert_grad_matches_fd(loss, logits[0])
    with pytest.raises(ValueError, match="mask"):
        M.soft_dice(probs[0], target[0], mask=np.ones((5, 6)))


# -- distance transform and Hausdorff --------------------------------------------------------


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("spacing_kind", ["unit", "anisotropic"])
def test_distance_transform_against_scipy(ndim, spacing_kind):
    shape = {1: (17,), 2: SHAPES[2], 3: SHAPES[3]}[ndim]
    mask = np.random.default_rng(ndim).random(shape) > 0.15  # sparse background
    spacing = (1.0,) * ndim if spacing_kind == "unit" else ({1: (0.7,)} | SPACINGS)[ndim]
    expected = ndi.distance_transform_edt(mask, sampling=spacing)
    got = jax.jit(M.distance_transform)(mask, jnp.asarray(spacing))
    if spacing_kind == "unit":  # squared distances are small integers, exact in float32
        np.testing.assert_array_equal(jnp.square(got).round(), np.square(expected).round())
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2.5e-7)  # a GPU's sqrt: 1 ulp
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_distance_transform_edge_cases():
    edt = jax.jit(M.distance_transform)
    np.testing.assert_array_equal(edt(np.zeros((4, 3), bool)), 0.0)
    assert np.all(np.isinf(np.asarray(edt(np.ones((4, 3), bool)))))
    # A single background voxel: distances to it, in mm, along every axis order.
    mask = np.ones((5, 7, 3), bool)
    mask[1, 5, 2] = False
    grid = Grid.from_spacing(mask.shape, (0.5, 2.0, 1.0))
    expected = ndi.distance_transform_edt(mask, sampling=(0.5, 2.0, 1.0))
    np.testing.assert_allclose(edt(mask, grid), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        M.distance_transform(mask, Grid((5, 7, 4)))


def test_masked_percentile_matches_numpy():
    # Ties, a single selected value and none at all: the order statistics come from bisection
    # over float bit patterns, so check them against numpy's sort-based percentile directly.
    rng = np.random.default_rng(6)
    values = np.round(rng.random(200) * 8, 1).astype(np.float32)  # many ties
    values[:5] = 0.0
    for q in (0.0, 37.5, 95.0, 100.0):
        f = jax.jit(lambda v, s: M._masked_percentile(v, s, q))
        for selected in (rng.random(200) > 0.5, np.arange(200) == 7, values > 7.5):
            np.testing.assert_allclose(f(values, selected), np.percentile(values[selected], q), rtol=1e-6)
        assert np.isinf(float(f(values, np.zeros(200, bool))))


def test_surface_against_scipy():
    blob = random_blob(SHAPES[3], 7, fraction=0.5)
    expected = blob & ~ndi.binary_erosion(blob, ndi.generate_binary_structure(3, 1), border_value=0)
    np.testing.assert_array_equal(M.surface(blob), expected)


@pytest.mark.parametrize("ndim", [2, 3])
def test_hausdorff_against_scipy(ndim):
    spacing = SPACINGS[ndim]
    hd = jax.jit(M.hausdorff_distance, static_argnames="percentile")
    # Each percentile is a compile; other percentiles are checked on _masked_percentile itself.
    percentiles = (95.0, 100.0)
    for seed in range(3):
        a = random_blob(SHAPES[ndim], seed)
        b = random_blob(SHAPES[ndim], seed + 100)
        for q in percentiles:
            expected = numpy_hausdorff(a, b, q, spacing)
            np.testing.assert_allclose(hd(a, b, percentile=q, spacing=spacing), expected, rtol=1e-5)
    assert float(hd(a, a, percentile=95.0, spacing=spacing)) == 0.0


def test_hausdorff_known_value():
    # Two squares, one shifted by 3 voxels of 2 mm along axis 0: every directed distance is
    # at most 6 mm and the corner rows reach it.
    a = np.zeros((20, 16), bool)
    a[4:10, 4:10] = True
    b = np.roll(a, 3, axis=0)
    got = jax.jit(M.hausdorff_distance, static_argnames="percentile")(a, b, percentile=100, spacing=(2.0, 1.0))
    np.testing.assert_allclose(got, 6.0)


def test_hausdorff_empty_masks_give_inf():
    a = random_blob(SHAPES[2], 1)
    empty = np.zeros(SHAPES[2], bool)
    hd95 = jax.jit(M.hd95)
    assert np.isinf(float(hd95(a, empty)))
    assert np.isinf(float(hd95(empty, a)))
    assert np.isinf(float(hd95(empty, empty)))


def test_hausdorff_vmap_and_errors():
    a = np.stack([random_blob(SHAPES[3], s) for s in range(3)])
    b = np.stack([random_blob(SHAPES[3], s + 50) for s in range(3)])
    spacings = jnp.asarray([[1.0, 1.0, 1.0], [2.0, 1.0, 0.5], [0.8, 1.2, 3.0]])
    f = lambda x, y, s: M.hd95(x, y, spacing=s)
    assert_jit_matches(f, a[1], b[1], spacings[1])
    got = assert_vmap_matches_loop(jax.jit(f), a, b, spacings)
    for i in range(3):
        np.testing.assert_allclose(got[i], numpy_hausdorff(a[i], b[i], 95, np.asarray(spacings[i])), rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        M.hd95(a[0], a[0, :-1])
    with pytest.raises(ValueError, match="percentile"):
        M.hausdorff_distance(a[0], b[0], percentile=101)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a[0], b[0], spacing=(1.0, 2.0))


# -- folding ---------------------------------------------------------------------------------


def test_negative_jacobian_fraction():
    rng = np.random.default_rng(8)
    det = rng.normal(loc=0.7, size=(2, 12, 10, 8)).astype(np.float32)
    det[0, 0, 0, :3] = 0.0  # det == 0 counts as folded
    mask = (rng.random(det.shape) > 0.3).astype(np.float32)
    f = lambda d, m: M.negative_jacobian_fraction(d, mask=m)
    np.testing.assert_allclose(M.negative_jacobian_fraction(det[0]), np.mean(det[0] <= 0), rtol=1e-6)
    np.testing.assert_allclose(assert_jit_matches(f, det[0], mask[0]), np.sum(mask[0] * (det[0] <= 0)) / mask[0].sum(), rtol=1e-6)
    assert_vmap_matches_loop(jax.jit(f), det, mask)
    assert np.isnan(float(M.negative_jacobian_fraction(det[0], mask=np.zeros_like(mask[0]))))
    with pytest.raises(ValueError, match="mask"):
        M.negative_jacobian_fraction(det[0], mask=mask[0, :-1])


# -- landmarks and inverse consistency -------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_target_registration_error(ndim):
    rng = np.random.default_rng(9)
    fixed = rng.normal(scale=20, size=(7, ndim)).astype(np.float32)
    t = rng.normal(size=ndim).astype(np.float32)
    tre = M.target_registration_error(lambda x: x + t, fixed, fixed)
    assert tre.shape == (7,)
    np.testing.assert_allclose(tre, np.linalg.norm(t), rtol=1e-5)
    np.testing.assert_allclose(M.target_registration_error(lambda x: x + t, fixed, fixed + t), 0.0, atol=1e-5)

    A = np.eye(ndim, dtype=np.float32) + rng.normal(scale=0.1, size=(ndim, ndim)).astype(np.float32)
    moving = rng.normal(scale=20, size=(7, ndim)).astype(np.float32)
    affine = lambda x: x @ A.T + t
    expected = np.linalg.norm(fixed @ A.T + t - moving, axis=-1)
    np.testing.assert_allclose(M.target_registration_error(affine, fixed, moving), expected, rtol=1e-5)
    np.testing.assert_allclose(M.mean_target_registration_error(affine, fixed, moving), expected.mean(), rtol=1e-5)
    weights = np.array([1, 1, 1, 0, 0, 1, 0], np.float32)  # padded landmark set
    np.testing.assert_allclose(
        M.mean_target_registration_error(affine, fixed, moving, mask=weights), expected[weights > 0].mean(), rtol=1e-5
    )


def test_tre_jit_vmap_grad():
    rng = np.random.default_rng(10)
    fixed = rng.normal(scale=5, size=(3, 6, 3)).astype(np.float32)
    moving = rng.normal(scale=5, size=(3, 6, 3)).astype(np.float32)
    shifts = rng.normal(size=(3, 3)).astype(np.float32)
    f = lambda t, p, q: M.target_registration_error(lambda x: x + t, p, q)
    assert_jit_matches(f, shifts[0], fixed[0], moving[0])
    assert_vmap_matches_loop(jax.jit(f), shifts, fixed, moving)
    g = lambda t, p, q: M.mean_target_registration_error(lambda x: x + t, p, q)
    assert_vmap_matches_loop(jax.jit(g), shifts, fixed, moving)
    assert_grad_matches_fd(jax.jit(lambda t: g(t, fixed[0], moving[0])), shifts[0])
    # A perfect match has finite (zero) gradient, not NaN from the norm at 0.
    grad = jax.grad(lambda t: g(t, fixed[0], fixed[0] + 1.0))(jnp.ones(3))
    np.testing.assert_allclose(grad, 0.0)


def test_tre_errors():
    p = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        M.target_registration_error(lambda x: x, p, p[:, :2])
    with pytest.raises(ValueError, match="transform"):
        M.target_registration_error(lambda x: x[..., :2], p, p)


@pytest.mark.parametrize("ndim", [2, 3])
def test_inverse_consistency_error(ndim):
    rng = np.random.default_rng(11)
    points = Grid.from_spacing(SHAPES[ndim], SPACINGS[ndim]).points()
    t1 = rng.normal(size=ndim).astype(np.float32)
    t2 = rng.normal(size=ndim).astype(np.float32)
    translate = lambda t: (lambda x: x + t)
    np.testing.assert_allclose(M.inverse_consistency_error(translate(t1), translate(-t1), points), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        M.inverse_consistency_error(translate(t1), translate(t2), points), np.linalg.norm(t1 + t2), rtol=1e-5
    )
    # An affine map and its inverse, with a mask restricting the mean to part of the grid.
    A = np.eye(ndim) + rng.normal(scale=0.1, size=(ndim, ndim))
    inv = np.linalg.inv(A)
    forward = lambda x: precise_matmul(x, jnp.asarray(A.T, jnp.float32))  # TF32 on a GPU otherwise
    backward = lambda x: precise_matmul(x, jnp.asarray(inv.T, jnp.float32))
    mask = np.zeros(SHAPES[ndim], np.float32)
    mask[: SHAPES[ndim][0] // 2] = 1.0
    np.testing.assert_allclose(M.inverse_consistency_error(forward, backward, points, mask=mask), 0.0, atol=1e-4)
    # Scaling by 2 then by 1: error ||x|| averaged over the masked points.
    scale2 = lambda x: 2.0 * x
    expected = np.sum(mask * np.linalg.norm(np.asarray(points), axis=-1)) / mask.sum()
    np.testing.assert_allclose(M.inverse_consistency_error(scale2, lambda x: x, points, mask=mask), expected, rtol=1e-5)


def test_ice_jit_vmap():
    rng = np.random.default_rng(12)
    points = jnp.asarray(rng.normal(size=(3, 10, 2)), jnp.float32)
    t1 = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    t2 = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    f = lambda a, b, p: M.inverse_consistency_error(lambda x: x + a, lambda x: x + b, p)
    assert_jit_matches(f, t1[0], t2[0], points[0])
    got = assert_vmap_matches_loop(jax.jit(f), t1, t2, points)
    np.testing.assert_allclose(got, np.linalg.norm(t1 + t2, axis=-1), rtol=1e-5)
    # Exactly inverse transforms: zero error with finite gradient.
    grad = jax.grad(lambda a: f(a, -a, points[0]))(t1[0])
    assert np.all(np.isfinite(np.asarray(grad)))
