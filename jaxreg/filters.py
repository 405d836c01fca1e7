"""Separable smoothing, box sums and image pyramids, for any spatial rank.

Every filter acts on the spatial axes of ONE image, ``(*spatial)`` or channels-last
``(*spatial, C)`` (pass ``ndim=`` to say how many axes are spatial), one axis at a time:
a 1-D pass is a sum of shifted slices of a padded array (Gaussian) or a difference of two
slices of a cumulative sum (box), which XLA fuses into a few passes over memory. Filter
settings (``sigma``, ``radius``, ``factor``) are static Python numbers; image data may be
traced, batched with ``vmap`` and differentiated.

>>> import jax.numpy as jnp
>>> box_sum(jnp.ones((3, 4)), 1).tolist()
[[4.0, 6.0, 6.0, 4.0], [6.0, 9.0, 9.0, 6.0], [4.0, 6.0, 6.0, 4.0]]
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import _checks
from jaxreg.grid import PRECISE, Grid, Image

__all__ = [
    "gaussian_kernel_1d",
    "gaussian_smooth",
    "box_sum",
    "box_mean",
    "antialias_sigma",
    "downsample",
    "pyramid",
]

# scipy.ndimage mode name -> numpy/jax pad mode with the same boundary semantics.
_PAD_MODES = {
    "nearest": "edge",  # a a a | a b c d | d d d
    "reflect": "symmetric",  # c b a | a b c d | d c b
    "mirror": "reflect",  # d c b | a b c d | c b a
    "wrap": "wrap",  # b c d | a b c d | a b c
    "constant": "constant",  # 0 0 0 | a b c d | 0 0 0
}


def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _spatial_rank(x, ndim, *, name="image") -> int:
    ndim, _ = _checks.spatial_rank_of(x.ndim, ndim, name=name)
    if ndim < 1:
        raise ValueError(f"{name} needs at least one spatial axis; got shape {x.shape}")
    _checks.check_not_empty(x, name=name)
    return ndim


def _radii(radius, ndim: int) -> tuple[int, ...]:
    radii = _checks.per_axis(radius, ndim, name="radius")
    if any(r < 0 or r != int(r) for r in radii):
        raise ValueError(f"radius must be a non-negative integer (or one per axis); got {radius}")
    return tuple(int(r) for r in radii)


def gaussian_kernel_1d(sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """Normalized 1-D Gaussian weights, as ``scipy.ndimage.gaussian_filter`` uses them.

    The radius is ``int(truncate * sigma + 0.5)``; ``sigma = 0`` gives ``[1.0]``. Returned
    in float64 on the host; filters cast it to the dtype of the data.

    >>> gaussian_kernel_1d(1.0, truncate=1.0).round(4).tolist()
    [0.2741, 0.4519, 0.2741]
    """
    _checks.check_nonnegative(sigma, name="sigma")
    _checks.check_nonnegative(truncate, name="truncate")
    sigma = float(sigma)
    radius = int(truncate * sigma + 0.5)
    if sigma == 0.0 or radius == 0:
        return np.ones(1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _pad_axis(x, axis: int, before: int, after: int, mode: str):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, mode=_PAD_MODES[mode])


def _correlate_axis(x, weights: np.ndarray, axis: int, mode: str):
    """Correlate ``x`` with a symmetric odd-length kernel along ``axis``."""
    radius = (len(weights) - 1) // 2
    if radius == 0:
        return x * float(weights[0])
    n = x.shape[axis]
    padded = _pad_axis(x, axis, radius, radius, mode)

    def shifted(offset):
        return jax.lax.slice_in_dim(padded, radius + offset, radius + offset + n, axis=axis)

    # Symmetric weights: one multiply per pair of taps. Python floats keep x's dtype.
    out = float(weights[radius]) * shifted(0)
    for k in range(1, radius + 1):
        out = out + float(weights[radius + k]) * (shifted(-k) + shifted(k))
    return out


# For channels-last fields, or kernels of this many taps (sigma >= 5), each axis pass is
# a product with an (n, n) banded matrix instead of a sum of shifted copies. XLA CPU
# fuses shifted sums with their producer and recomputes it per tap (smoothing a freshly
# composed 80x96x112x3 field: 811 ms shifted, 205 ms as products), and strides over a
# short channel axis badly; a product is never fused and costs the same for any sigma.
# Shifted sums stay faster for scalar volumes and moderate kernels (160x192x224,
# sigma 1: 197 vs 343 ms; sigma 2: 125 ms shifted).
_MATMUL_MIN_TAPS = 41


@functools.lru_cache(maxsize=128)
def _smoothing_matrix(n: int, weights: tuple, mode: str, dtype: str) -> np.ndarray:
    # Filtering the identity gives the filter's matrix, boundary mode included. In numpy
    # on the host: op by op in JAX, the 12 matrices of one greedy registration took 2 s of
    # its tracing time.
    radius = (len(weights) - 1) // 2
    padded = np.pad(np.eye(n), [(radius, radius), (0, 0)], mode=_PAD_MODES[mode])
    matrix = sum(w * padded[k : k + n] for k, w in enumerate(weights))
    return np.asarray(matrix, dtype=dtype)


def _smooth_by_products(x, kernels: list, ndim: int, mode: str):
    """Separable smoothing as one matrix product per spatial axis (``kernels[axis]`` is
    None to leave an axis alone), each contracting the LEADING axis of ``x`` seen as a
    matrix and putting the filtered axis LAST: after every spatial axis the channels lead,
    and one transpose puts them back. Multiplying along an axis in place instead costs two
    transposes of the whole field per axis, which took half the time of a greedy step's
    field smoothing (80x96x112x3, sigma 0.5: 51 vs 26 ms a step)."""
    shape = list(x.shape)
    for axis in range(ndim):
        n = shape[0]
        flat = x.reshape(n, -1)
        if kernels[axis] is None:
            x = flat.T
        else:
            matrix = _smoothing_matrix(n, tuple(float(w) for w in kernels[axis]), mode, str(x.dtype))
            # (n, rest) contracted on n with the matrix's columns: (rest, n), no copy.
            x = jax.lax.dot_general(flat, jnp.asarray(matrix), (((0,), (1,)), ((), ())), precision=PRECISE)
        shape = shape[1:] + [n]
    x = x.reshape(shape)  # channels..., spatial...
    return jnp.moveaxis(x, tuple(range(x.ndim - ndim)), tuple(range(ndim, x.ndim))) if x.ndim > ndim else x


_SMOOTHING_METHODS = ("auto", "shifted", "products")


def gaussian_smooth(
    image, sigma, *, ndim: int | None = None, truncate: float = 4.0, mode: str = "nearest", method: str = "auto"
):
    """Gaussian smoothing over the spatial axes (separable; the channel axis is untouched).

    ``sigma`` is in voxels, a scalar or one value per spatial axis; 0 leaves an axis alone.
    ``mode`` names the boundary as ``scipy.ndimage`` does (``"nearest"``, ``"reflect"``,
    ``"mirror"``, ``"wrap"``, ``"constant"`` = zeros), and the result equals
    ``scipy.ndimage.gaussian_filter(image, sigma, mode=mode, truncate=truncate)``.

    ``method`` chooses how each axis is filtered; every choice gives the same result
    within float32 rounding. ``"shifted"`` sums shifted copies of the image, one per pair
    of taps; ``"products"`` multiplies each axis by its ``(n, n)`` banded filter matrix.
    ``"auto"`` (the default) takes products for channels-last fields and for kernels of
    41 taps or more, shifted sums otherwise. Ask for ``"products"`` where the result feeds
    a gather (a warp): XLA CPU may fuse shifted sums, and whatever computes the image,
    into the gather and recompute them for every corner it reads, which it never does
    with a matrix product (drawing a 3-D synthetic training batch: 9.9 vs 5.0 ms).

    >>> import jax.numpy as jnp
    >>> round(float(gaussian_smooth(jnp.ones((5, 4)), 2.0).min()), 5)  # weights sum to 1
    1.0
    """
    x = _as_float(image)
    ndim = _spatial_rank(x, ndim)
    sigmas = _checks.per_axis(sigma, ndim, name="sigma")
    _checks.check_nonnegative(sigmas, name="sigma")
    if mode not in _PAD_MODES:
        raise ValueError(f"mode must be one of {sorted(_PAD_MODES)}; got {mode!r}")
    if method not in _SMOOTHING_METHODS:
        raise ValueError(f"method must be one of {_SMOOTHING_METHODS}; got {method!r}")
    kernels = [gaussian_kernel_1d(s, truncate=truncate) if s > 0 else None for s in sigmas]
    if all(k is None or len(k) == 1 for k in kernels):
        return x
    if method == "auto":
        wide = any(k is not None and len(k) >= _MATMUL_MIN_TAPS for k in kernels)
        method = "products" if x.ndim > ndim or wide else "shifted"
    if method == "products":
        return _smooth_by_products(x, kernels, ndim, mode)
    for axis, weights in enumerate(kernels):
        if weights is not None:
            x = _correlate_axis(x, weights, axis, mode)
    return x


# Window sums up to this radius use XLA's reduce_window, larger ones cumulative sums.
# Measured on a 160x192x224 volume on CPU (forward, forward + gradient): r = 4
# reduce_window 47/63 ms vs cumsum 159/280 ms; r = 16 111/222 vs 243/344 ms; r = 32
# 1096/2308 vs 197/319 ms. reduce_window is also exact, where float32 cumulative sums
# lose up to ~1e-3 on such a volume; beyond the threshold the cost stays flat in r.
_REDUCE_WINDOW_MAX_RADIUS = 16


def _box_sum_axis(x, radius: int, axis: int):
    if radius <= _REDUCE_WINDOW_MAX_RADIUS:
        window = [1] * x.ndim
        window[axis] = 2 * radius + 1
        padding = [(0, 0)] * x.ndim
        padding[axis] = (radius, radius)
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, tuple(window), (1,) * x.ndim, padding)
    n = x.shape[axis]
    # One extra leading zero makes the window sum a difference of two slices of the
    # cumulative sum: sum(x[i-r..i+r]) = c[i+2r+1] - c[i], whatever r is.
    c = jnp.cumsum(_pad_axis(x, axis, radius + 1, radius, "constant"), axis=axis)
    return jax.lax.slice_in_dim(c, 2 * radius + 1, 2 * radius + 1 + n, axis=axis) - jax.lax.slice_in_dim(
        c, 0, n, axis=axis
    )


def box_sum(image, radius, *, ndim: int | None = None):
    """Sum over a ``(2r+1)`` window along every spatial axis, zeros outside the image.

    ``radius`` is an int, or one per spatial axis. Windows up to radius 16 are summed
    directly by XLA's ``reduce_window`` (fastest there, and exact); larger ones come from
    cumulative sums, whose cost per voxel does not grow with the radius (float32
    cumulative sums lose about ``eps * (axis length) * max|x|`` in absolute terms).

    >>> import jax.numpy as jnp
    >>> box_sum(jnp.arange(5.0), 1).tolist()
    [1.0, 3.0, 6.0, 9.0, 7.0]
    """
    x = _as_float(image)
    ndim = _spatial_rank(x, ndim)
    for axis, r in enumerate(_radii(radius, ndim)):
        if r > 0:
            x = _box_sum_axis(x, r, axis)
    return x


def box_mean(image, radius, *, ndim: int | None = None):
    """:func:`box_sum` divided by the full window size ``prod(2r+1)``.

    Near the border the window is cut by the image but the divisor is not, so the result
    is ``scipy.ndimage.uniform_filter(image, 2r+1, mode="constant")``. For a mean over the
    voxels inside the image, divide ``box_sum(image, r)`` by ``box_sum(ones, r)``.
    """
    x = _as_float(image)
    ndim = _spatial_rank(x, ndim)
    radii = _radii(radius, ndim)
    return box_sum(x, radii, ndim=ndim) / float(math.prod(2 * r + 1 for r in radii))


def antialias_sigma(factor) -> float:
    """Gaussian sigma (in fine voxels) applied before subsampling by ``factor``.

    A voxel already averages about half a voxel of blur (sigma0 = 1/2); a coarse voxel
    should carry sigma0 = factor/2 fine voxels, so the filter adds the difference in
    quadrature: ``0.5 * sqrt(factor**2 - 1)``. It tends to ``factor/2`` for large factors,
    is 0 for ``factor <= 1`` (no smoothing to upsample) and leaves 30-40% of the amplitude
    at the coarse grid's Nyquist frequency: enough to stop aliasing of fine texture without
    blurring the coarse level more than its voxel size does.
    """
    factor = float(factor)
    return 0.5 * math.sqrt(factor**2 - 1.0) if factor > 1.0 else 0.0


def _resample_axis(x, axis: int, factor: float, size: int):
    """Linear interpolation along ``axis`` at ``(factor - 1)/2 + factor * i``, ``i < size``.

    Positions past the last voxel (odd sizes) take the edge value.
    """
    n = x.shape[axis]
    if factor == int(factor):
        # Integer factors: every sample sits on a voxel (odd factor) or halfway between two
        # (even factor), so strided slices do it without a gather (and without a scatter in
        # the backward pass).
        f = int(factor)
        start = (f - 1) // 2
        half = f % 2 == 0
        last = start + f * (size - 1) + (1 if half else 0)
        if last >= n:
            x = _pad_axis(x, axis, 0, last - n + 1, "nearest")
        stop = start + f * (size - 1) + 1
        out = jax.lax.slice_in_dim(x, start, stop, stride=f, axis=axis)
        if half:
            out = 0.5 * (out + jax.lax.slice_in_dim(x, start + 1, stop + 1, stride=f, axis=axis))
        return out
    positions = (factor - 1.0) / 2.0 + factor * np.arange(size)
    lower = np.floor(positions)
    frac = (positions - lower).astype(np.float64)
    i0 = np.clip(lower, 0, n - 1).astype(np.int32)
    i1 = np.clip(lower + 1, 0, n - 1).astype(np.int32)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = jnp.asarray(frac.reshape(shape), dtype=x.dtype)
    return jnp.take(x, i0, axis=axis) * (1 - frac) + jnp.take(x, i1, axis=axis) * frac


def downsample(image, factor=2, *, ndim: int | None = None):
    """Anti-aliased resampling onto the voxel centres of ``Grid(shape).scaled(factor)``.

    The image is smoothed with sigma :func:`antialias_sigma` per axis (``"nearest"``
    boundary), then sampled with linear interpolation at index ``(f-1)/2 + f*i``, the centre
    of each block of ``f`` voxels. The output shape is ``Grid(shape).scaled(factor).shape``
    (``round(n / f)``, at least 1); with odd sizes the last centre may lie past the last voxel
    and takes the edge value. ``factor`` is a positive number or one per axis; integer factors
    use strided slices, others a gather; ``factor < 1`` upsamples without smoothing.

    >>> import jax.numpy as jnp
    >>> downsample(jnp.full((6, 5), 3.0), 2).tolist()
    [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]
    """
    x = _as_float(image)
    ndim = _spatial_rank(x, ndim)
    factors = _checks.per_axis(factor, ndim, name="factor")
    _checks.check_positive(factors, name="factor")
    out_shape = Grid(x.shape[:ndim]).scaled(factors).shape
    x = gaussian_smooth(x, [antialias_sigma(f) for f in factors], ndim=ndim, mode="nearest")
    for axis, (f, m) in enumerate(zip(factors, out_shape)):
        if f != 1.0:
            x = _resample_axis(x, axis, f, m)
    return x


def pyramid(image, levels: int, *, factor=2, affine=None, ndim: int | None = None) -> list[Image]:
    """Images at ``levels`` resolutions, coarsest first and the input itself last.

    Level ``k`` from the end is ``downsample(image, factor**k)`` placed on
    ``grid.scaled(factor**k)``, so every level covers the same physical space. Each level
    is computed from the finest one (not from the next finer), which keeps its shape and
    matrix exactly those of ``grid.scaled(factor**k)``. ``image`` is an
    :class:`~jaxreg.grid.Image` or an array (with ``affine``, default identity, and ``ndim``
    for channels-last arrays).

    >>> import jax.numpy as jnp
    >>> [level.shape for level in pyramid(jnp.zeros((16, 12)), 3)]
    [(4, 3), (8, 6), (16, 12)]
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1; got {levels!r}")
    if isinstance(image, Image):
        if affine is not None:
            raise ValueError("pass affine only with a plain array; an Image carries its own")
        finest = image
    else:
        finest = Image(_as_float(image), affine, ndim=ndim)
    factors = _checks.per_axis(factor, finest.ndim, name="factor")
    _checks.check_positive(factors, name="factor")
    grid = finest.grid
    out = []
    for k in reversed(range(1, int(levels))):
        level_factor = tuple(f**k for f in factors)
        data = downsample(finest.data, level_factor, ndim=finest.ndim)
        out.append(Image(data, grid.scaled(level_factor).affine))
    out.append(finest)
    return out
