"""Similarity of two images, as factories of pure losses.

Every factory takes its settings (keyword-only) and returns

    ``f(warped, fixed, mask=None) -> scalar loss``

for ONE pair of scalar images of the same shape and any spatial rank (batches and channels
come from ``jax.vmap``). Lower is better. ``mask`` holds non-negative weights broadcastable
to the image; means are weighted, ``sum(w * x) / sum(w)`` (0 where no voxel has weight, with
a finite gradient with respect to the weights there too). Where a loss looks at
neighbourhoods (``lncc``, ``ssim``) the window statistics are weighted too, and where it
takes differences (``ngf``, ``mind_ssc``) a voxel counts only if every voxel its stencil
touches has weight > 0: either way, voxels of weight 0 never change the value. Integer
images are compared in float32; float64 stays float64.

Losses of identical images: 0 for ``mse``, ``ssd``, ``ncc``, ``lncc``, ``ssim``,
``mind_ssc``; ``-H(image)`` (its soft-histogram entropy, the minimum over aligned pairs)
for ``mutual_information``; for ``nmi`` and ``ngf`` the minimum in practice but 0 only in
a limit (hard histogram; no flat regions), see each function.

>>> import jax.numpy as jnp
>>> x = jnp.linspace(0.0, 1.0, 48).reshape(8, 6)
>>> round(float(ncc()(x, x)), 6), round(float(mse()(x, x + 0.5)), 6)
(0.0, 0.25)
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import _checks, differential, filters
from jaxreg.grid import precise_matmul

__all__ = [
    "mse",
    "ssd",
    "ncc",
    "lncc",
    "mutual_information",
    "nmi",
    "joint_histogram",
    "ngf",
    "ssim",
    "ssim_map",
    "mind_ssc",
    "mind_ssc_descriptor",
    "SIMILARITIES",
]


# -- shared plumbing ------------------------------------------------------------------------
def _prepare(warped, fixed, mask):
    """Validate a pair at trace time; return float images and the weights (or None)."""
    a, b = jnp.asarray(warped), jnp.asarray(fixed)
    _checks.check_same_shape(a, b, names=("warped", "fixed"))
    if a.ndim < 1:
        raise ValueError(f"warped and fixed must have at least one spatial axis; got shape {a.shape}")
    _checks.check_not_empty(a, name="warped")
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    if mask is None:
        return a, b, None
    w = jnp.asarray(mask)
    try:
        broadcast = np.broadcast_shapes(w.shape, a.shape)
    except ValueError:
        broadcast = None
    if broadcast != a.shape:
        raise ValueError(f"mask of shape {w.shape} does not broadcast to the image shape {a.shape}")
    return a, b, jnp.broadcast_to(w.astype(dtype), a.shape)


def _tiny(dtype):
    return float(jnp.finfo(dtype).tiny)


def _divide(num, den):
    """``num / den`` where ``den`` is a normal positive number, else 0; finite gradients.

    The plain guard ``num / max(den, tiny)`` has the derivative ``-num / max(den, tiny)**2``,
    which overflows to -inf where ``den`` is 0 (a window or a mask without weight), and
    inf times a zero cotangent is NaN. The double ``where`` divides only where ``den`` is
    large enough and gives 0, with zero gradient, elsewhere.
    """
    large = den > _tiny(den.dtype)
    return jnp.where(large, num / jnp.where(large, den, 1.0), 0.0)


def _wmean(x, w):
    if w is None:
        return jnp.mean(x)
    return _divide(jnp.sum(w * x), jnp.sum(w))


def _safe_sqrt(s):
    # sqrt'(0) is infinite: the double `where` keeps value and gradient finite at 0.
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _xlogx(p):
    positive = p > 0
    return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def _erode(w, radius: int):
    """Weights ``w`` kept only where no voxel within ``radius`` (Chebyshev) has weight <= 0.

    Voxels outside the image do not count: stencils clamp to the border instead.
    """
    if w is None:
        return None
    outside = filters.box_sum((w <= 0).astype(w.dtype), radius)
    return jnp.where(outside < 0.5, w, 0.0)


def _radius_tuple(radius, *, name="radius"):
    values = np.atleast_1d(np.asarray(radius))
    if values.ndim != 1 or not np.all(values == np.round(values)) or np.any(values < 0) or not np.any(values > 0):
        raise ValueError(f"{name} must be a non-negative integer (or one per axis), not all 0; got {radius}")
    return radius


def _masked_range(x, w):
    """Min and max of ``x`` over voxels of positive weight, without gradient."""
    x = jax.lax.stop_gradient(x)
    valid = jnp.ones(x.shape, bool) if w is None else w > 0
    lo = jnp.min(jnp.where(valid, x, jnp.inf))
    hi = jnp.max(jnp.where(valid, x, -jnp.inf))
    empty = ~jnp.any(valid)
    return jnp.where(empty, 0.0, lo).astype(x.dtype), jnp.where(empty, 0.0, hi).astype(x.dtype)


def _nonzero_span(lo, hi):
    # A constant image has span 0; dividing by it would send every voxel to +-inf. Any
    # positive span maps a constant to one value, so fall back to 1.
    span = hi - lo
    return jnp.where(span > 1e-6 * (jnp.abs(lo) + jnp.abs(hi)) + _tiny(span.dtype) ** 0.5, span, 1.0)


# -- intensity differences ------------------------------------------------------------------
def mse():
    """Mean squared difference ``mean(w * (warped - fixed)**2)``; 0 for identical images.

    >>> import jax.numpy as jnp
    >>> float(mse()(jnp.zeros(4), jnp.full(4, 2.0)))
    4.0
    """

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        return _wmean((a - b) ** 2, w)

    return loss


def ssd():
    """Sum of squared differences ``sum(w * (warped - fixed)**2)`` (not halved, not averaged).

    Grows with the number of voxels, so its weight against a regularizer depends on the
    resolution; prefer :func:`mse` unless a sum is what an algorithm needs.
    """

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        sq = (a - b) ** 2
        return jnp.sum(sq) if w is None else jnp.sum(w * sq)

    return loss


# -- correlation ----------------------------------------------------------------------------
def _correlation(cov, var_a, var_b, eps):
    # (cov + eps) / sqrt((var_a + eps)(var_b + eps)) lies in [-1, 1] (Cauchy-Schwarz), is 1
    # for identical images, flat ones included (eps/eps), and its gradient is finite
    # everywhere. It differs from cov / sqrt(var_a var_b) by O(eps / var).
    return (cov + eps) / jnp.sqrt((var_a + eps) * (var_b + eps))


def ncc(*, eps: float = 1e-5):
    """``1 - NCC``: one minus the (weighted) Pearson correlation over the whole image.

    The correlation is regularised as ``(cov + eps) / sqrt((var_a + eps)(var_b + eps))``:
    in ``[-1, 1]``, exactly 1 for identical images (constant ones too), finite gradients on
    constant images. ``eps`` is in squared intensity units, so rescale images to about [0, 1].
    The loss lies in ``[0, 2]``.
    """
    _checks.check_positive(eps, name="eps")

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        da, db = a - _wmean(a, w), b - _wmean(b, w)
        return 1.0 - _correlation(_wmean(da * db, w), _wmean(da * da, w), _wmean(db * db, w), eps)

    return loss


def _three_box_radii(radius: int) -> tuple[int, int, int]:
    """Radii of three boxes whose convolution has the variance of one box of ``radius``.

    A box of radius r has variance r(r+1)/3, and variances add under convolution. Among
    integer triples the closest variance wins (always exact: Gauss's three-triangular-number
    theorem), then the most equal radii (most Gaussian).
    """
    target = radius * (radius + 1)
    best = min(
        itertools.combinations_with_replacement(range(radius + 1), 3),
        key=lambda t: (abs(sum(r * (r + 1) for r in t) - target), t[2] - t[0]),
    )
    return best


def _local_sums(stack, radii, window: str, ndim: int):
    """Window sums of a channels-FIRST ``(C, *spatial)`` stack, channel by channel.

    Channels first, because XLA CPU strides badly over a short trailing channel axis: the
    box sums of a 6-channel 80x96x112 stack took 16 ms channels-last, 10 ms channels-first.
    """

    def per_channel(x):
        if window == "box":
            return filters.box_sum(x, radii, ndim=ndim)
        for k in range(3):
            x = filters.box_sum(x, [t[k] for t in per_axis], ndim=ndim)
        return x

    per_axis = None if window == "box" else [_three_box_radii(r) for r in radii]
    return jax.vmap(per_channel)(stack)


def _window_counts(shape, radii, window: str, dtype):
    """How many voxels of the image each window holds (its weight for an unmasked image),
    as an outer product of 1-D counts: the constant XLA folds instead of a sixth channel."""
    counts = jnp.ones((), dtype)
    for axis, (n, r) in enumerate(zip(shape, radii)):
        line = _local_sums(jnp.ones((1, n), dtype), (r,), window, 1)[0]
        counts = counts * line.reshape((n,) + (1,) * (len(shape) - axis - 1))
    return counts


def lncc(*, radius=4, window: str = "box", eps: float = 1e-5):
    """``1 - mean local NCC`` over windows of ``2*radius + 1`` voxels per axis.

    At each voxel the signed correlation of the two images in the window is
    ``(cov + eps) / sqrt((var_a + eps)(var_b + eps))`` (see :func:`ncc`; signed, not
    squared, so inverted contrast is penalised; flat windows in both images count as
    matched). Window statistics are means over voxels inside the image (and weighted by the
    mask), so the border is not biased towards zero. The loss lies in ``[0, 2]``.

    ``window="box"``: a flat window, from cumulative sums (cost independent of ``radius``).
    ``window="gaussian"``: a Gaussian window with the variance of the box of the same
    radius, ``sigma**2 = r(r+1)/3``, approximated by three successive box filters whose
    variances add up to it (also independent of ``radius`` in cost). The match is exact for
    every radius (``r(r+1)/2`` is a sum of three triangular numbers, Gauss), the radii as
    equal as that allows; ``radius=1`` degenerates to the box of radius 1.
    """
    _radius_tuple(radius)
    if window not in ("box", "gaussian"):
        raise ValueError(f"window must be 'box' or 'gaussian'; got {window!r}")
    _checks.check_positive(eps, name="eps")

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        ndim = a.ndim
        radii = tuple(int(r) for r in _checks.per_axis(radius, ndim, name="radius"))
        # Centring on the global mean first keeps E[x^2] - E[x]^2 from cancelling
        # catastrophically in float32 when intensities sit far from 0.
        a, b = a - _wmean(a, w), b - _wmean(b, w)
        wa, wb = (a, b) if w is None else (w * a, w * b)
        # Sums over the warped image's statistics apart from the fixed one's: the gradient
        # with respect to the warped image then box-filters 3 channels back, not all 6.
        sum_a, sum_aa, sum_ab = _local_sums(jnp.stack([wa, wa * a, wa * b]), radii, window, ndim)
        fixed_stats = [wb, wb * b] if w is None else [w, wb, wb * b]
        *weight, sum_b, sum_bb = _local_sums(jnp.stack(fixed_stats), radii, window, ndim)
        weight = _window_counts(a.shape, radii, window, a.dtype) if w is None else weight[0]
        inv = _divide(1.0, weight)
        mean_a, mean_b = sum_a * inv, sum_b * inv
        var_a = jnp.maximum(sum_aa * inv - mean_a * mean_a, 0.0)
        var_b = jnp.maximum(sum_bb * inv - mean_b * mean_b, 0.0)
        cov = sum_ab * inv - mean_a * mean_b
        return 1.0 - _wmean(_correlation(cov, var_a, var_b, eps), w)

    return loss


# -- information theory ---------------------------------------------------------------------
def _unit_interval(x, w, intensity_range):
    if intensity_range is None:
        lo, hi = _masked_range(x, w)
        # min/max carry no gradient (stop_gradient): the histogram moves with the voxels,
        # not with the two extreme ones. Values are in [0, 1] by construction.
        return (x - lo) / _nonzero_span(lo, hi)
    lo, hi = intensity_range
    return jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _parse_range(intensity_range):
    if intensity_range is None:
        return None, None
    r = np.asarray(intensity_range, dtype=float)
    if r.shape == (2,):
        r = np.stack([r, r])
    if r.shape != (2, 2) or not np.all(np.isfinite(r)) or np.any(r[:, 1] <= r[:, 0]):
        raise ValueError(
            "intensity_range must be (lo, hi) with lo < hi, or ((lo, hi), (lo, hi)) for "
            f"(warped, fixed); got {intensity_range}"
        )
    return tuple(r[0]), tuple(r[1])


def _check_bins(bins, sigma):
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2; got {bins!r}")
    if sigma is not None:
        _checks.check_positive(sigma, name="sigma")
    return float(0.5 / bins) if sigma is None else float(sigma)


def _parzen_reach(bins: int, sigma: float) -> int:
    """Bins either side of the nearest centre whose weight can show in float32 or float64.

    Relative to the nearest centre, bin ``j* + k`` weighs ``exp(-k (k - 2u) / (2 s**2))``
    with ``u`` in [-1/2, 1/2] the offset from that centre and ``s = sigma * bins`` (both in
    bins), so at most ``exp(-(k**2 - |k|) / (2 s**2))``; beyond the reach that is below
    ``exp(-40)``, about 4e-18: under float64's half-ulp of the normalizer (>= 1).
    """
    s2 = (sigma * bins) ** 2
    k = 1
    while k * (k - 1) < 80.0 * s2 and k < bins:
        k += 1
    return min(k, bins - 1)


def _parzen_memberships(bins: int, sigma: float):
    """``x -> (N, bins)`` Gaussian Parzen weights of ``x`` in [0, 1], each row summing to 1.

    ``softmax_j(-(x - c_j)**2 / (2 sigma**2))`` written relative to the nearest centre: the
    largest weight is exactly 1, so no max-reduction is needed for stability, and the
    normalizer and the mean centre come from the few bins within :func:`_parzen_reach`
    (elementwise, no reduction over the ``(N, bins)`` array). The derivative is the closed
    form ``d p_j / dx = p_j (c_j - mean_c) / sigma**2`` (a custom JVP, so forward and reverse
    mode and their compositions all work), with ``c_j - mean_c`` taken as offsets from the
    nearest centre so that no large terms cancel.
    """
    reach = _parzen_reach(bins, sigma)
    scale = 0.5 / (sigma * bins) ** 2  # in bin units

    def nearest_and_offset(x):
        nearest = jnp.clip(jnp.floor(x * bins), 0, bins - 1)
        return nearest, x * bins - (nearest + 0.5)

    def relative_weight(k, u):
        return jnp.exp(-scale * k * (k - 2.0 * u))

    def normalizer_and_mean(nearest, u):
        total, first = jnp.ones_like(u), jnp.zeros_like(u)
        for k in itertools.chain(range(-reach, 0), range(1, reach + 1)):
            inside = (nearest + k >= 0) & (nearest + k <= bins - 1)
            weight = jnp.where(inside, relative_weight(k, u), 0.0)
            total, first = total + weight, first + k * weight
        return total, first / total

    def weights(x):
        nearest, u = nearest_and_offset(x)
        total, mean = normalizer_and_mean(nearest, u)
        offsets = jnp.arange(bins, dtype=x.dtype) - nearest[:, None]
        return relative_weight(offsets, u[:, None]) / total[:, None], offsets - mean[:, None]

    @jax.custom_jvp
    def memberships(x):
        return weights(x)[0]

    @memberships.defjvp
    def _(primals, tangents):
        (x,), (x_dot,) = primals, tangents
        p, from_mean = weights(x)
        # c_j - mean_c = (k_j - mean_k) / bins; d/dx of the logits carries 1/sigma**2
        return p, (p * from_mean) * (x_dot / (bins * sigma**2))[:, None]

    return memberships


def _soft_joint(a, b, w, bins, sigma, range_a, range_b):
    a = _unit_interval(a, w, range_a).reshape(-1)
    b = _unit_interval(b, w, range_b).reshape(-1)
    memberships = _parzen_memberships(bins, sigma)
    pa, pb = memberships(a), memberships(b)
    if w is None:
        joint = precise_matmul(pa.T, pb) / a.shape[0]
    else:
        w = w.reshape(-1)
        joint = precise_matmul((w[:, None] * pa).T, pb)
        joint = _divide(joint, jnp.sum(w))
    return joint


def joint_histogram(warped, fixed, mask=None, *, bins: int = 32, sigma=None, intensity_range=None):
    """Differentiable Parzen-window joint histogram, ``(bins, bins)``, summing to 1.

    Intensities are mapped to [0, 1] (by their weighted min/max, without gradient, or by
    ``intensity_range`` and clipped); voxel ``n`` gives bin ``j`` (centre ``(j + 0.5)/bins``)
    the mass ``softmax_j(-(x_n - c_j)**2 / (2 sigma**2))``, ``sigma`` defaulting to half a
    bin. ``H[j, k] = sum_n w_n A[n, j] B[n, k] / sum_n w_n``, one ``(N, B)^T (N, B)``
    matmul, so memory is ``O(N * bins)``: subsample very large volumes first.
    """
    sigma = _check_bins(bins, sigma)
    range_a, range_b = _parse_range(intensity_range)
    a, b, w = _prepare(warped, fixed, mask)
    return _soft_joint(a, b, w, bins, sigma, range_a, range_b)


def _entropies(joint):
    h_ab = -jnp.sum(_xlogx(joint))
    h_a = -jnp.sum(_xlogx(jnp.sum(joint, axis=1)))
    h_b = -jnp.sum(_xlogx(jnp.sum(joint, axis=0)))
    return h_a, h_b, h_ab


def mutual_information(*, bins: int = 32, sigma=None, normalized: bool = False, intensity_range=None):
    """Negative mutual information (nats) of the soft joint histogram (:func:`joint_histogram`).

    ``normalized=False``: loss ``-MI = H(a,b) - H(a) - H(b)``, at best ``-H(fixed)``.
    ``normalized=True``: loss ``2 - (H(a) + H(b)) / H(a,b)`` in ``[0, 1]``, 0 when the
    joint histogram is a permutation-diagonal (identical images in the hard-histogram limit:
    intensities on bin centres, ``sigma`` well below a bin). With the default half-bin
    kernel the joint of an image with itself is blurred off the diagonal, so ``H(a,a) > H(a)``
    and identical images score a small positive (still minimal) value.

    ``intensity_range``: ``(lo, hi)`` for both images or ``((lo, hi), (lo, hi))`` for
    (warped, fixed); without it each image is rescaled by its own masked min/max (no
    gradient flows through them).
    """
    sigma = _check_bins(bins, sigma)
    range_a, range_b = _parse_range(intensity_range)

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        h_a, h_b, h_ab = _entropies(_soft_joint(a, b, w, bins, sigma, range_a, range_b))
        if normalized:
            return 2.0 - _divide(h_a + h_b, h_ab)
        return h_ab - h_a - h_b

    return loss


def nmi(*, bins: int = 32, sigma=None, intensity_range=None):
    """Normalized mutual information loss: ``mutual_information(normalized=True, ...)``."""
    return mutual_information(bins=bins, sigma=sigma, normalized=True, intensity_range=intensity_range)


# -- structure ------------------------------------------------------------------------------
def ngf(*, eps: float = 1e-2, spacing=1.0):
    """Normalized gradient fields (Haber & Modersitzki 2006):
    ``1 - mean((ga . gb)**2 / ((|ga|**2 + eps**2)(|gb|**2 + eps**2)))``.

    Gradients are central differences in world units (``spacing``: scalar, per axis or a
    :class:`~jaxreg.grid.Grid`). ``eps`` is the edge threshold in intensity per unit length:
    gradients well below it count as noise. The loss is in ``[0, 1]``; it rewards aligned
    edges, whatever their polarity and contrast, so identical images are a minimum but not
    0 (flat regions score 1) and raising the contrast of either image lowers it slightly.
    """
    _checks.check_positive(eps, name="eps")

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        ga = differential.spatial_gradient(a, spacing)
        gb = differential.spatial_gradient(b, spacing)
        num = jnp.sum(ga * gb, axis=-1) ** 2
        den = (jnp.sum(ga * ga, axis=-1) + eps**2) * (jnp.sum(gb * gb, axis=-1) + eps**2)
        return 1.0 - _wmean(num / den, _erode(w, 1))

    return loss


def ssim_map(warped, fixed, mask=None, *, sigma=1.5, data_range=None, k1: float = 0.01, k2: float = 0.03):
    """Local SSIM (Wang et al. 2004) at every voxel, Gaussian window (truncated at 3.5 sigma).

    Local means, variances and covariance are Gaussian-weighted averages over voxels inside
    the image (and weighted by ``mask``), population (not sample) statistics. Away from the
    border this is ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False, full=True)[1]``. ``data_range`` defaults to the max - min of
    ``fixed`` (masked, no gradient; 1 for a constant image). Where the mask leaves a
    window no weight at all, the statistics are the centre voxel's alone (variance 0).
    """
    a, b, w = _prepare(warped, fixed, mask)
    ndim = a.ndim
    sigmas = _checks.per_axis(sigma, ndim, name="sigma")
    _checks.check_positive(sigmas, name="sigma")
    if data_range is None:
        lo, hi = _masked_range(b, w)
        data_range = _nonzero_span(lo, hi)
    else:
        _checks.check_positive(data_range, name="data_range")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ones = jnp.ones_like(a) if w is None else w
    stats = jnp.stack([ones, ones * a, ones * b, ones * a * a, ones * b * b, ones * a * b], axis=-1)
    sums = filters.gaussian_smooth(stats, sigmas, ndim=ndim, truncate=3.5, mode="constant")
    # A window without weight takes its centre voxel's own statistics (mean = the voxel,
    # no variance): the limit as that voxel's weight goes to 0, so the gradient with
    # respect to the mask is the derivative of the value there too.
    empty = sums[..., 0] <= _tiny(a.dtype)
    inv = _divide(1.0, sums[..., 0])
    mean_a = jnp.where(empty, a, sums[..., 1] * inv)
    mean_b = jnp.where(empty, b, sums[..., 2] * inv)
    var_a = jnp.where(empty, 0.0, jnp.maximum(sums[..., 3] * inv - mean_a * mean_a, 0.0))
    var_b = jnp.where(empty, 0.0, jnp.maximum(sums[..., 4] * inv - mean_b * mean_b, 0.0))
    cov = jnp.where(empty, 0.0, sums[..., 5] * inv - mean_a * mean_b)
    num = (2 * mean_a * mean_b + c1) * (2 * cov + c2)
    den = (mean_a * mean_a + mean_b * mean_b + c1) * (var_a + var_b + c2)
    return num / den


def ssim(*, sigma=1.5, data_range=None, k1: float = 0.01, k2: float = 0.03):
    """``1 - mean SSIM`` with a Gaussian window (:func:`ssim_map`); 0 for identical images.

    ``data_range``: the dynamic range L in ``C1 = (k1 L)**2``, ``C2 = (k2 L)**2``; default
    the range of ``fixed``, so the loss is not symmetric in its two arguments.
    """
    _checks.check_positive(sigma, name="sigma")
    if data_range is not None:
        _checks.check_positive(data_range, name="data_range")

    def loss(warped, fixed, mask=None):
        values = ssim_map(warped, fixed, mask, sigma=sigma, data_range=data_range, k1=k1, k2=k2)
        _, _, w = _prepare(warped, fixed, mask)
        return 1.0 - _wmean(values, w)

    return loss


# -- self-similarity descriptors ------------------------------------------------------------
def _ssc_offsets(ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs of six-neighbourhood offsets at distance sqrt(2): 2d(d-1) of them."""
    neighbours = []
    for axis in range(ndim):
        for sign in (-1, 1):
            offset = [0] * ndim
            offset[axis] = sign
            neighbours.append(tuple(offset))
    return [
        (p, q)
        for p, q in itertools.combinations(neighbours, 2)
        if sum((u - v) ** 2 for u, v in zip(p, q)) == 2
    ]


def _mind(x, radius: int, dilation: int, weights):
    ndim = x.ndim
    padded = jnp.pad(x, dilation, mode="edge")

    def shifted(offset):
        starts = [dilation + dilation * o for o in offset]
        return jax.lax.slice(padded, starts, [s + n for s, n in zip(starts, x.shape)])

    diffs = jnp.stack([(shifted(p) - shifted(q)) ** 2 for p, q in _ssc_offsets(ndim)], axis=-1)
    distance = filters.box_mean(diffs, radius, ndim=ndim)
    variance = jnp.mean(distance, axis=-1)
    # Flat neighbourhoods have variance 0. The floor is relative to the image's mean
    # variance (as in Heinrich's code), so the descriptor stays invariant to a * I + b, with
    # an absolute floor whose inverse square is still finite for constant images.
    floor = jnp.maximum(1e-3 * _wmean(variance, weights), _tiny(x.dtype) ** 0.25)
    variance = jnp.maximum(variance, floor)
    # exp(-D/V) divided by its max over pairs, written without the division.
    return jnp.exp(-(distance - jnp.min(distance, axis=-1, keepdims=True)) / variance[..., None])


def _check_mind_settings(radius, dilation):
    for name, value in (("radius", radius), ("dilation", dilation)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    if radius < 0 or dilation < 1:
        raise ValueError(f"need radius >= 0 and dilation >= 1; got radius={radius}, dilation={dilation}")


def mind_ssc_descriptor(image, *, radius: int = 1, dilation: int = 2):
    """MIND-SSC self-similarity context (Heinrich et al. 2013), shape ``(*spatial, P)``.

    For the ``P = 2d(d-1)`` pairs of offsets ``(p, q)`` among ``+-dilation * e_k`` that lie
    ``sqrt(2) * dilation`` apart (4 in 2-D, 12 in 3-D), ``D_pq(x)`` is :func:`box_mean
    <jaxreg.filters.box_mean>` over ``radius`` of ``(I(y + p) - I(y + q))**2``, where
    ``I(y + p)`` takes the edge value past the border. The descriptor is
    ``exp(-D/V) / max_pairs exp(-D/V)`` with ``V`` the mean of ``D`` over the pairs, floored
    at 1e-3 times its image mean (as Heinrich's code does, which however averages
    ``D - min D``). Invariant to ``a * I + b`` (a > 0).
    Pair order: neighbours ``-e0, +e0, -e1, +e1, ...`` combined in lexicographic order.
    """
    _check_mind_settings(radius, dilation)
    x = jnp.asarray(image)
    if x.ndim < 2:
        raise ValueError(f"MIND-SSC needs at least 2 spatial axes (pairs of axes); got shape {x.shape}")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return _mind(x, radius, dilation, None)


def mind_ssc(*, radius: int = 1, dilation: int = 2):
    """Mean absolute difference of :func:`mind_ssc_descriptor` of the two images.

    In ``[0, 1]``, 0 for identical images (and for images equal up to ``a * I + b``). With
    a mask, a voxel counts only if its whole descriptor support (``radius + dilation``) has
    weight > 0, and the variance floor uses the same weights.
    """
    _check_mind_settings(radius, dilation)

    def loss(warped, fixed, mask=None):
        a, b, w = _prepare(warped, fixed, mask)
        if a.ndim < 2:
            raise ValueError(f"MIND-SSC needs at least 2 spatial axes; got shape {a.shape}")
        w = _erode(w, radius + dilation)
        diff = jnp.abs(_mind(a, radius, dilation, w) - _mind(b, radius, dilation, w))
        return _wmean(jnp.mean(diff, axis=-1), w)

    return loss


#: Name -> factory, for command lines and configuration files.
SIMILARITIES = {
    "mse": mse,
    "ssd": ssd,
    "ncc": ncc,
    "lncc": lncc,
    "mi": mutual_information,
    "nmi": nmi,
    "ngf": ngf,
    "ssim": ssim,
    "mind": mind_ssc,
}
