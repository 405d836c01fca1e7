import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.losses import similarity as S
from tests.helpers import assert_finite_grad, assert_grad_matches_fd, assert_jit_matches, assert_vmap_matches_loop

SHAPES = [(24, 20), (12, 10, 8)]
TINY32 = float(np.finfo(np.float32).tiny)


def smooth_image(shape, seed=0, sigma=1.5):
    """A smooth random image rescaled to [0, 1]."""
    x = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def half_mask(shape):
    """Positive, non-binary weights on the first 60% of axis 0, zero elsewhere."""
    mask = np.zeros(shape, np.float32)
    cut = int(0.6 * shape[0])
    mask[:cut] = 1.0
    mask[:cut, ::2] = 0.5
    return mask


# Every similarity, with settings for small test images. "mi"/"nmi" with a fixed intensity
# range are the variants whose value is a smooth function of every voxel (finite differences
# move the min/max too); the "auto" ones rescale by min/max without gradient.
CASES = {
    "mse": (S.mse, {}),
    "ssd": (S.ssd, {}),
    "ncc": (S.ncc, {}),
    "lncc_box": (S.lncc, {"radius": 2}),
    "lncc_gaussian": (S.lncc, {"radius": 2, "window": "gaussian"}),
    "mi": (S.mutual_information, {"bins": 16, "intensity_range": (-0.25, 1.25)}),
    "mi_auto": (S.mutual_information, {"bins": 16}),
    "nmi": (S.nmi, {"bins": 16, "intensity_range": (-0.25, 1.25)}),
    "nmi_auto": (S.nmi, {"bins": 16}),
    "ngf": (S.ngf, {"eps": 0.05}),
    "ssim": (S.ssim, {"data_range": 1.0}),
    "ssim_auto": (S.ssim, {}),
    "mind": (S.mind_ssc, {}),
}
ZERO_AT_IDENTITY = {"mse", "ssd", "ncc", "lncc_box", "lncc_gaussian", "ssim", "ssim_auto", "mind"}
SMOOTH_IN_EVERY_VOXEL = [name for name in CASES if not name.endswith("_auto")]


def make(name):
    factory, kwargs = CASES[name]
    return factory(**kwargs)


# -- the contract every similarity satisfies ------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_identical_images_are_the_minimum(name, shape):
    loss = make(name)
    fixed = smooth_image(shape)
    at_identity = float(loss(fixed, fixed))
    if name in ZERO_AT_IDENTITY:
        assert abs(at_identity) < 1e-5
    noise = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for moved in (fixed + 0.05 * noise, np.roll(fixed, 1, axis=0), smooth_image(shape, seed=2)):
        assert at_identity < float(loss(moved, fixed)) - 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_jit_and_vmap(name, shape):
    loss = make(name)
    warped, fixed = smooth_image(shape, 0), smooth_image(shape, 1)
    value = assert_jit_matches(loss, warped, fixed)
    assert value.shape == () and value.dtype == jnp.float32
    batch_w = np.stack([smooth_image(shape, s) for s in (0, 2, 3)])
    batch_f = np.stack([smooth_image(shape, s) for s in (1, 4, 1)])
    masks = np.stack([half_mask(shape), np.ones(shape, np.float32), half_mask(shape)[::-1]])
    assert_vmap_matches_loop(loss, batch_w, batch_f, masks, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(10, 9), (7, 6, 5)])
@pytest.mark.parametrize("name", SMOOTH_IN_EVERY_VOXEL)
def test_gradient_matches_finite_differences(name, shape):
    loss = make(name)
    fixed = smooth_image(shape, 1, sigma=1.0)
    warped = 0.6 * smooth_image(shape, 0, sigma=1.0) + 0.4 * fixed
    # MIND has kinks (|.|, min over pairs) within 1e-3 of this point; x64 makes 1e-4 safe
    eps = 1e-4
    assert_grad_matches_fd(lambda x: loss(x, fixed), warped, eps=eps)
    if len(shape) == 2:
        mask = half_mask(shape) + 0.1  # all positive: every voxel moves the value
        assert_grad_matches_fd(lambda x: loss(x, fixed, mask), warped, eps=eps, seed=1)


@pytest.mark.parametrize("name", ["mi_auto", "nmi_auto", "ssim_auto"])
def test_gradient_of_auto_range_losses_away_from_the_extremes(name):
    # min/max carry no gradient by design: check along directions that leave them alone
    shape = (10, 9)
    loss = make(name)
    fixed = smooth_image(shape, 1, sigma=1.0)
    warped = 0.6 * smooth_image(shape, 0, sigma=1.0) + 0.4 * fixed
    keep = np.ones(shape)
    for extreme in (np.argmin(warped), np.argmax(warped)):
        keep.flat[extreme] = 0.0
    assert_grad_matches_fd(lambda u: loss(warped + keep * u, fixed), np.zeros(shape), eps=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_are_finite_on_constant_images(name, shape):
    loss = make(name)
    constant = jnp.full(shape, 0.3)
    image = jnp.asarray(smooth_image(shape))
    # a NaN or Inf in any term would show in the sum's gradient
    assert_finite_grad(lambda x: loss(x, constant) + loss(x, image) + loss(x, constant, half_mask(shape)), constant)
    assert_finite_grad(lambda x: loss(x, constant), image)
    assert np.isfinite(float(loss(constant, constant)))


def soft_mask_with_zeros(shape, seed=5):
    """half_mask times random weights in [0.2, 1]: the last 40% of axis 0 is zero, deep
    enough that whole LNCC and SSIM windows there have no weight."""
    return (half_mask(shape) * np.random.default_rng(seed).uniform(0.2, 1.0, shape)).astype(np.float32)


# The losses whose value is smooth in every weight, zero weights included (the others
# drop voxels near a zero weight, ngf and mind by erosion, the auto-range ones from the
# min/max: a step in the value, and no derivative to check).
SMOOTH_IN_THE_MASK = ["mse", "ssd", "ncc", "lncc_box", "lncc_gaussian", "mi", "nmi", "ssim"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_gradient_wrt_a_mask_with_zeros_is_finite(name, shape):
    # A zero window sum used to give 1/max(0, tiny), whose derivative overflows: NaN
    # (lncc, ssim), and a NaN mask gradient breaks register_syn, which warps the mask.
    loss = make(name)
    warped, fixed = smooth_image(shape, 0), smooth_image(shape, 1)
    for mask in (soft_mask_with_zeros(shape), np.zeros(shape, np.float32)):
        grad = assert_finite_grad(lambda w: loss(warped, fixed, w), mask)
        assert np.any(grad != 0) or not mask.any()
    # and the image gradient stays finite with such a mask
    assert_finite_grad(lambda x: loss(x, fixed, soft_mask_with_zeros(shape)), warped)


@pytest.mark.parametrize("name", SMOOTH_IN_THE_MASK)
def test_gradient_wrt_a_mask_with_zeros_matches_finite_differences(name):
    # One voxel at a time (a random direction over many zero weights is not a
    # differentiable path: a window whose weights sum to +-h divides by h), in float64:
    # a voxel deep in the zero region, one at its border, one of positive weight.
    shape = (24, 20)
    loss = make(name)
    warped, fixed = smooth_image(shape, 0), smooth_image(shape, 1)
    mask = soft_mask_with_zeros(shape)
    voxels = [(21, 10), (14, 3), (5, 7)]
    assert mask[voxels[0]] == 0 and mask[voxels[1]] == 0 and mask[voxels[2]] > 0
    with jax.enable_x64(True):
        a, b, w = (jnp.asarray(x, jnp.float64) for x in (warped, fixed, mask))
        f = jax.jit(lambda w: loss(a, b, w))
        grad = np.asarray(jax.jit(jax.grad(lambda w: loss(a, b, w)))(w))
        h = 1e-5
        for voxel in voxels:
            step = jnp.zeros(shape, jnp.float64).at[voxel].set(h)
            numeric = (float(f(w + step)) - float(f(w - step))) / (2 * h)
            np.testing.assert_allclose(grad[voxel], numeric, rtol=1e-4, atol=1e-8, err_msg=str(voxel))
        if name == "mse":
            # analytic: d/dw_i [sum(w e) / sum(w)] = (e_i - mse) / sum(w), e = (a - b)**2
            e = np.asarray((a - b) ** 2)
            expected = (e - float(f(w))) / float(jnp.sum(w))
            np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_zero_weight_voxels_do_not_change_the_value(name, shape):
    loss = make(name)
    warped, fixed = smooth_image(shape, 0), smooth_image(shape, 1)
    mask = half_mask(shape)
    rng = np.random.default_rng(7)
    outside = mask == 0
    warped2 = np.where(outside, rng.random(shape) * 5 - 2, warped).astype(np.float32)
    fixed2 = np.where(outside, rng.random(shape), fixed).astype(np.float32)
    reference = float(loss(warped, fixed, mask))
    np.testing.assert_allclose(float(loss(warped2, fixed2, mask)), reference, rtol=1e-5, atol=1e-6)
    # a mask of ones is no mask; a mask that only broadcasts is accepted
    np.testing.assert_allclose(float(loss(warped, fixed, np.ones(shape))), float(loss(warped, fixed)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss(warped, fixed, 1.0)), float(loss(warped, fixed)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_shape_errors(name):
    loss = make(name)
    with pytest.raises(ValueError, match=r"\(24, 20\).*\(24, 19\)"):
        loss(jnp.zeros((24, 20)), jnp.zeros((24, 19)))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\).*\(24, 20\)"):
        loss(jnp.zeros((24, 20)), jnp.zeros((24, 20)), jnp.ones(3))


def test_integer_images_are_compared_in_float32():
    a = np.arange(20, dtype=np.int32).reshape(5, 4)
    assert S.mse()(a, a + 1).dtype == jnp.float32
    assert float(S.mse()(a, a + 1)) == 1.0


def test_registry():
    assert set(S.SIMILARITIES) == {"mse", "ssd", "ncc", "lncc", "mi", "nmi", "ngf", "ssim", "mind"}
    x = smooth_image((24, 20))
    for factory in S.SIMILARITIES.values():
        assert np.isfinite(float(factory()(x, x)))


# -- references -----------------------------------------------------------------------------
def _wmean(x, w):
    return np.sum(w * x) / np.sum(w)


def test_mse_ssd_reference():
    a, b = smooth_image((24, 20), 0), smooth_image((24, 20), 1)
    w = half_mask((24, 20))
    np.testing.assert_allclose(float(S.mse()(a, b)), np.mean((a - b) ** 2.0), rtol=1e-5)
    np.testing.assert_allclose(float(S.mse()(a, b, w)), _wmean((a - b) ** 2.0, w), rtol=1e-5)
    np.testing.assert_allclose(float(S.ssd()(a, b, w)), np.sum(w * (a - b) ** 2.0), rtol=1e-5)


def _ncc_reference(a, b, w, eps):
    a, b = a.astype(float), b.astype(float)
    da, db = a - _wmean(a, w), b - _wmean(b, w)
    cov, va, vb = _wmean(da * db, w), _wmean(da * da, w), _wmean(db * db, w)
    return 1 - (cov + eps) / np.sqrt((va + eps) * (vb + eps))


@pytest.mark.parametrize("shape", SHAPES)
def test_ncc_reference_and_affine_intensity_invariance(shape):
    a, b = smooth_image(shape, 0), smooth_image(shape, 1)
    w = half_mask(shape)
    np.testing.assert_allclose(float(S.ncc()(a, b)), _ncc_reference(a, b, np.ones(shape), 1e-5), atol=1e-6)
    np.testing.assert_allclose(float(S.ncc(eps=1e-3)(a, b, w)), _ncc_reference(a, b, w, 1e-3), atol=1e-6)
    assert float(S.ncc()(3.0 * a + 2.0, a)) < 1e-3
    assert float(S.ncc()(1.0 - a, a)) > 1.99


def _lncc_reference(a, b, radius, eps, w=None):
    """Local NCC with scipy's uniform_filter: means over the in-image part of each window."""
    a, b = a.astype(float), b.astype(float)
    w = np.ones(a.shape) if w is None else w.astype(float)
    size = 2 * np.asarray(radius) + 1 if np.ndim(radius) else 2 * radius + 1
    box = lambda x: ndi.uniform_filter(x, size, mode="constant")
    count = box(w)
    mean = lambda x: box(w * x) / np.maximum(count, 1e-30)
    ma, mb = mean(a), mean(b)
    va = np.maximum(mean(a * a) - ma**2, 0)
    vb = np.maximum(mean(b * b) - mb**2, 0)
    cov = mean(a * b) - ma * mb
    cc = (cov + eps) / np.sqrt((va + eps) * (vb + eps))
    return 1 - np.sum(w * cc) / np.sum(w)


@pytest.mark.parametrize("shape,radius", [((24, 20), 4), ((24, 20), (2, 5)), ((12, 10, 8), 2), ((12, 10, 8), 4)])
def test_lncc_box_matches_uniform_filter_reference(shape, radius):
    a, b = smooth_image(shape, 0), smooth_image(shape, 1)
    c = 0.7 * a + 0.3 * b
    for x, y in ((a, b), (a, c)):
        np.testing.assert_allclose(float(S.lncc(radius=radius)(x, y)), _lncc_reference(x, y, radius, 1e-5), atol=2e-5)
    w = half_mask(shape)
    np.testing.assert_allclose(
        float(S.lncc(radius=radius, eps=1e-3)(a, c, w)), _lncc_reference(a, c, radius, 1e-3, w), atol=2e-5
    )


def _lncc_true_gaussian(a, b, radius, eps=1e-5):
    sigma = np.sqrt(radius * (radius + 1) / 3)
    window = lambda x: ndi.gaussian_filter(x, sigma, mode="constant", truncate=4.0)
    a, b = a.astype(float), b.astype(float)
    count = window(np.ones(a.shape))
    mean = lambda x: window(x) / count
    ma, mb = mean(a), mean(b)
    va, vb, cov = mean(a * a) - ma**2, mean(b * b) - mb**2, mean(a * b) - ma * mb
    return 1 - np.mean((cov + eps) / np.sqrt((va + eps) * (vb + eps)))


@pytest.mark.parametrize("shape,radius", [((24, 20), 2), ((24, 20), 4), ((24, 20), 6), ((12, 10, 8), 3)])
def test_lncc_gaussian_window_is_close_to_a_true_gaussian(shape, radius):
    a, b = smooth_image(shape, 0), smooth_image(shape, 1)
    for y in (b, 0.7 * a + 0.3 * b):
        approx = float(S.lncc(radius=radius, window="gaussian")(a, y))
        assert abs(approx - _lncc_true_gaussian(a, y, radius)) < 0.02


def test_three_box_radii_match_the_box_variance():
    for radius in range(1, 12):
        radii = S._three_box_radii(radius)
        variance = sum(r * (r + 1) / 3 for r in radii)
        target = radius * (radius + 1) / 3
        assert variance == pytest.approx(target)
    assert S._three_box_radii(4) == (1, 2, 3)


def test_lncc_cost_does_not_depend_on_radius():
    x = jnp.zeros((24, 20))
    sizes = [
        len(jax.make_jaxpr(lambda a: S.lncc(radius=r, window=window)(a, a))(x).eqns)
        for window in ("box", "gaussian")
        for r in (2, 9)
    ]
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3]


def test_lncc_settings_errors():
    with pytest.raises(ValueError, match="radius"):
        S.lncc(radius=-1)
    with pytest.raises(ValueError, match="radius"):
        S.lncc(radius=0)
    with pytest.raises(ValueError, match="window"):
        S.lncc(window="triangle")
    with pytest.raises(ValueError, match="radius"):
        S.lncc(radius=(2, 2, 2))(jnp.zeros((6, 5)), jnp.zeros((6, 5)))


# -- mutual information ---------------------------------------------------------------------
def _soft_histogram_reference(a, b, w, bins, sigma, lo_hi_a, lo_hi_b):
    centres = (np.arange(bins) + 0.5) / bins

    def memberships(x, lo_hi):
        lo, hi = lo_hi
        u = np.clip((x.astype(float).ravel() - lo) / (hi - lo), 0, 1)
        k = np.exp(-0.5 * ((u[:, None] - centres[None, :]) / sigma) ** 2)
        return k / k.sum(axis=1, keepdims=True)

    pa, pb = memberships(a, lo_hi_a), memberships(b, lo_hi_b)
    w = w.astype(float).ravel()
    return (w[:, None] * pa).T @ pb / w.sum()


def _entropy(p):
    p = p[p > 0]
    return -np.sum(p * np.log(p))


@pytest.mark.parametrize("shape", SHAPES)
def test_joint_histogram_matches_direct_formula(shape):
    a, b = smooth_image(shape, 0), smooth_image(shape, 1) * 3 - 1
    w = half_mask(shape)
    hist = S.joint_histogram(a, b, w, bins=12)
    inside = w > 0
    ref = _soft_histogram_reference(
        a, b, w, 12, 0.5 / 12, (a[inside].min(), a[inside].max()), (b[inside].min(), b[inside].max())
    )
    assert hist.shape == (12, 12)
    np.testing.assert_allclose(np.asarray(hist), ref, atol=1e-6)
    np.testing.assert_allclose(float(hist.sum()), 1.0, rtol=1e-5)
    hist = S.joint_histogram(a, b, bins=8, sigma=0.1, intensity_range=((0, 1), (-2, 3)))
    ref = _soft_histogram_reference(a, b, np.ones(shape), 8, 0.1, (0, 1), (-2, 3))
    np.testing.assert_allclose(np.asarray(hist), ref, atol=1e-6)


@pytest.mark.parametrize("bins, sigma_in_bins", [(32, 0.5), (8, 0.1), (12, 3.0), (5, 40.0)])
def test_parzen_memberships_match_softmax_in_float64(bins, sigma_in_bins):
    # the closed-form shift and the truncated normalizer must give the full softmax, edges
    # (0, 1, bin borders) included, for narrow kernels and for ones wider than the range
    sigma = sigma_in_bins / bins
    x = np.concatenate([[0.0, 1.0, 0.5 / bins, 1.0 / bins, 1.0 - 1e-9], np.random.default_rng(0).random(200)])
    centres = (np.arange(bins) + 0.5) / bins
    logits = -0.5 * ((x[:, None] - centres) / sigma) ** 2
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    with jax.enable_x64(True):
        got = S._parzen_memberships(bins, sigma)(jnp.asarray(x))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-15)
        # derivative: p_j (c_j - sum_k p_k c_k) / sigma**2, forward and reverse mode alike
        slope = expected * (centres - (expected @ centres)[:, None]) / sigma**2
        memberships = S._parzen_memberships(bins, sigma)
        forward = jax.jvp(memberships, (jnp.asarray(x),), (jnp.ones(x.shape),))[1]
        np.testing.assert_allclose(np.asarray(forward), slope, rtol=1e-9, atol=1e-9 * np.abs(slope).max())
        weights = np.random.default_rng(1).standard_normal(expected.shape)
        reverse = jax.grad(lambda v: jnp.sum(memberships(v) * weights))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(reverse), (slope * weights).sum(axis=1), rtol=1e-9, atol=1e-9)


def test_mutual_information_second_derivatives_agree_in_both_modes():
    # the Parzen window's custom JVP must compose: forward-over-reverse equals reverse-over-reverse
    # and the Hessian-vector product matches finite differences of the gradient
    a, b = smooth_image((6, 5), 0), smooth_image((6, 5), 1)
    with jax.enable_x64(True):
        a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
        grad = jax.grad(lambda x: S.mutual_information(bins=8, intensity_range=(-0.5, 1.5))(x, b))
        direction = jnp.asarray(np.random.default_rng(2).standard_normal(a.shape))
        forward_over_reverse = jax.jvp(grad, (a,), (direction,))[1]
        reverse_over_reverse = jax.grad(lambda x: jnp.vdot(grad(x), direction))(a)
        np.testing.assert_allclose(forward_over_reverse, reverse_over_reverse, rtol=1e-9, atol=1e-12)
        h = 1e-5
        central = (grad(a + h * direction) - grad(a - h * direction)) / (2 * h)
        np.testing.assert_allclose(forward_over_reverse, central, rtol=1e-5, atol=1e-6 * float(jnp.abs(central).max()))


def test_mutual_information_of_an_image_with_itself():
    a = smooth_image((24, 20))
    # soft histogram: -MI = H(a,a) - 2 H(a), all from the same soft histogram
    joint = _soft_histogram_reference(a, a, np.ones(a.shape), 16, 0.5 / 16, (0, 1), (0, 1))
    expected = _entropy(joint.ravel()) - 2 * _entropy(joint.sum(axis=1))
    np.testing.assert_allclose(float(S.mutual_information(bins=16)(a, a)), expected, rtol=1e-5)
    # hard-histogram limit (values on bin centres, narrow kernel): MI(a, a) = H(a), NMI loss 0
    q = ((np.floor(a * 7.999) + 0.5) / 8).astype(np.float32)
    _, counts = np.unique(q, return_counts=True)
    entropy = _entropy(counts / counts.sum())
    settings = dict(bins=8, sigma=0.01, intensity_range=(0, 1))
    np.testing.assert_allclose(float(S.mutual_information(**settings)(q, q)), -entropy, rtol=1e-5)
    assert abs(float(S.nmi(**settings)(q, q))) < 1e-6


def test_mutual_information_invariances():
    a, b = smooth_image((24, 20), 0), smooth_image((24, 20), 1)
    mi = S.mutual_information(bins=16)
    self_information = float(mi(a, a))
    # exact for an increasing affine remap (min/max rescaling), close for a monotone one
    np.testing.assert_allclose(float(mi(3.0 * a + 1.0, a)), self_information, rtol=1e-5)
    for remap in (a**2, np.exp(a), np.log1p(a)):
        assert abs(float(mi(remap, a)) - self_information) < 0.1 * abs(self_information)
    assert float(mi(a, b)) > 0.3 * self_information
    # decreasing remaps carry the same information too
    assert abs(float(mi(1.0 - a, a)) - self_information) < 1e-4


def test_mutual_information_of_independent_noise_is_small():
    rng = np.random.default_rng(0)
    a, b = rng.random((64, 64)).astype(np.float32), rng.random((64, 64)).astype(np.float32)
    mi = S.mutual_information(bins=16)
    assert -float(mi(a, b)) < 0.03
    assert -float(mi(a, a)) > 1.5
    assert 0.9 < float(S.nmi(bins=16)(a, b)) <= 1.0


def test_mutual_information_settings_errors():
    with pytest.raises(ValueError, match="bins"):
        S.mutual_information(bins=1)
    with pytest.raises(ValueError, match="sigma"):
        S.mutual_information(sigma=0.0)
    with pytest.raises(ValueError, match="intensity_range"):
        S.nmi(intensity_range=(1.0, 0.0))


# -- ngf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,spacing", [((24, 20), 1.0), ((12, 10, 8), (1.0, 2.0, 0.5))])
def test_ngf_matches_numpy_reference(shape, spacing):
    a, b = smooth_image(shape, 0), smooth_image(shape, 1)
    eps = 0.05
    spacings = spacing if isinstance(spacing, tuple) else (spacing,) * len(shape)
    ga = np.stack(np.gradient(a.astype(float), *spacings), -1)
    gb = np.stack(np.gradient(b.astype(float), *spacings), -1)
    num = np.sum(ga * gb, -1) ** 2
    den = (np.sum(ga * ga, -1) + eps**2) * (np.sum(gb * gb, -1) + eps**2)
    np.testing.assert_allclose(float(S.ngf(eps=eps, spacing=spacing)(a, b)), 1 - np.mean(num / den), atol=1e-5)
    # polarity does not matter
    np.testing.assert_allclose(float(S.ngf(eps=eps)(1 - a, a)), float(S.ngf(eps=eps)(a, a)), atol=1e-6)


# -- ssim -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 28), (16, 14, 13)])
def test_ssim_matches_skimage_in_the_interior(shape):
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    a = smooth_image(shape, 0)
    b = np.clip(a + 0.05 * np.random.default_rng(1).standard_normal(shape), 0, 1).astype(np.float32)
    mean, full = structural_similarity(
        a.astype(float), b.astype(float), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, full=True,
    )
    ours = np.asarray(S.ssim_map(a, b, data_range=1.0))
    interior = tuple(slice(5, -5) for _ in shape)  # skimage crops (win_size - 1) // 2 = 5
    np.testing.assert_allclose(ours[interior], full[interior], atol=1e-4)
    np.testing.assert_allclose(ours[interior].mean(), mean, atol=1e-5)
    # default data_range: the range of the fixed image
    np.testing.assert_allclose(
        np.asarray(S.ssim_map(a, b)), np.asarray(S.ssim_map(a, b, data_range=float(b.max() - b.min()))), atol=1e-6
    )
    np.testing.assert_allclose(float(S.ssim(data_range=1.0)(a, b)), 1 - ours.mean(), atol=1e-6)


def test_ssim_settings_errors():
    with pytest.raises(ValueError, match="data_range"):
        S.ssim(data_range=0.0)
    with pytest.raises(ValueError, match="sigma"):
        S.ssim(sigma=-1.0)


# -- mind -----------------------------------------------------------------------------------
def _mind_reference(x, radius, dilation):
    """MIND-SSC by explicit loops over voxels, pairs and patch offsets."""
    x = x.astype(float)
    shape, d = np.array(x.shape), x.ndim
    neighbours = []
    for axis in range(d):
        for sign in (-1, 1):
            offset = np.zeros(d, int)
            offset[axis] = sign
            neighbours.append(offset)
    pairs = [(p, q) for p, q in itertools.combinations(neighbours, 2) if np.sum((p - q) ** 2) == 2]
    value = lambda y: x[tuple(np.clip(y, 0, shape - 1))]
    distance = np.zeros(tuple(shape) + (len(pairs),))
    window = (2 * radius + 1) ** d
    for voxel in np.ndindex(*shape):
        for j, (p, q) in enumerate(pairs):
            total = 0.0
            for offset in np.ndindex(*[2 * radius + 1] * d):
                y = np.array(voxel) + np.array(offset) - radius
                if np.any(y < 0) or np.any(y >= shape):
                    continue
                total += (value(y + dilation * p) - value(y + dilation * q)) ** 2
            distance[voxel + (j,)] = total / window
    variance = distance.mean(axis=-1)
    variance = np.maximum(variance, max(1e-3 * variance.mean(), TINY32**0.25))
    descriptor = np.exp(-distance / variance[..., None])
    return descriptor / descriptor.max(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape,radius,dilation", [((14, 12), 1, 2), ((11, 9), 2, 1), ((8, 7, 6), 1, 2)])
def test_mind_descriptor_matches_loop_reference(shape, radius, dilation):
    x = smooth_image(shape, 3, sigma=1.0)
    ours = np.asarray(S.mind_ssc_descriptor(x, radius=radius, dilation=dilation))
    assert ours.shape == shape + (2 * len(shape) * (len(shape) - 1),)
    np.testing.assert_allclose(ours, _mind_reference(x, radius, dilation), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_mind_is_invariant_to_affine_intensity_changes(shape):
    x = smooth_image(shape, 0)
    descriptor = np.asarray(S.mind_ssc_descriptor(x))
    for a, b in ((3.0, 1.0), (0.25, -2.0)):
        np.testing.assert_allclose(np.asarray(S.mind_ssc_descriptor(a * x + b)), descriptor, atol=1e-5)
        assert float(S.mind_ssc()(a * x + b, x)) < 1e-5
    assert float(S.mind_ssc()(x, x)) == 0.0


def test_mind_errors():
    with pytest.raises(ValueError, match="2 spatial axes"):
        S.mind_ssc_descriptor(jnp.zeros(8))
    with pytest.raises(ValueError, match="dilation"):
        S.mind_ssc(dilation=0)
    with pytest.raises(ValueError, match="radius"):
        S.mind_ssc(radius=1.5)
