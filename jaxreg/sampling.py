"""Interpolation of images at index coordinates: the hottest kernel of the library.

``sample(image, coords)`` reads a scalar ``(*spatial)`` or channels-last ``(*spatial, C)``
image at index coordinates ``(..., d)`` (component ``k`` indexes array axis ``k``, as in
``scipy.ndimage.map_coordinates`` but with the vector last).

Why a custom derivative: the derivative of linear or cubic interpolation with respect to
the coordinates is the same weighted sum of the same gathered voxels, with the weights
replaced by their derivatives. The forward pass therefore computes the spatial gradient
alongside the value from one set of gathers, and the gradient with respect to the
coordinates is a single elementwise product: no scatter, nothing else saved. The image
tangent is the same gather with the same weights; JAX transposes it (to a scatter-add)
only when the image itself is differentiated. For displacement fields (linear, 'nearest'
mode) the backward pass rebuilds that gather's indices and weights from one cell index
and position per point, and scatters in one go (:func:`_read_tangent`; the gradient of a
scaling and squaring of a 160x192x224 field 1.4x faster); elsewhere, from 2**21 points a
call, they are recomputed rather than kept. Where such a 3-D field is read at the points
it moves (both differentiated), below 2**22 points the coordinate gradient too is computed
in the backward pass rather than kept (:data:`_RECOMPUTE_COORDINATE_GRADIENT_MAX_POINTS`).

Nesting: XLA fuses the cheap weighted sum that ends one ``sample`` into whatever reads
its result, and recomputes it per use. When the result feeds the *coordinates* of the
next ``sample`` (scaling and squaring, a network that warps, looks again and warps again)
each level multiplies the work, and k unrolled levels cost about ``(2**d)**k``. Put such
chains inside ``lax.fori_loop``/``lax.scan``: a loop body is a materialisation boundary,
and the cost is linear in k again (``Velocity.exp`` does this). Summing the taps as a
reduction also stops the blow-up, but makes every single warp several times slower on
CPU, so it is not done here.
"""

from __future__ import annotations

import functools
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxreg import _checks

__all__ = ["sample", "spline_prefilter", "MODES"]

#: Boundary modes and their names in scipy.ndimage / torch.nn.functional.grid_sample.
MODES = {
    "constant": "cval beyond the edge, interpolated across it (scipy 'grid-constant', torch 'zeros')",
    "nearest": "edge value repeated (scipy 'nearest', torch 'border')",
    "wrap": "periodic (scipy 'grid-wrap')",
    "mirror": "reflected about the edge voxel centres: d c b | a b c d | c b a (scipy 'mirror')",
    "reflect": "reflected about the edge: d c b a | a b c d | d c b a (scipy 'reflect')",
}

# Pole of the cubic B-spline interpolation filter, and the half-length at which its
# impulse response sqrt(3) * z**|k| falls below 1e-9: the prefilter is a separable FIR
# of that length, which is exact to float32 precision and vectorises on every backend
# (a recursive IIR filter would be a sequential scan along each axis).
_CUBIC_POLE = np.sqrt(3.0) - 2.0
_PREFILTER_HALF_LENGTH = 16

# How scipy.ndimage.spline_filter extends a signal past its ends, per boundary mode (the
# initial conditions of its recursive filter), as the np.pad mode whose FIR result is the
# same: 'mirror' and 'grid-constant' (and scipy's own 'constant', 'wrap') take the
# whole-sample mirror, 'reflect' and 'nearest' the half-sample one, 'grid-wrap' the period.
_PREFILTER_EXTENSION = {
    "mirror": "reflect",
    "constant": "reflect",
    "reflect": "symmetric",
    "nearest": "symmetric",
    "wrap": "wrap",
}
# scipy.ndimage.map_coordinates pads the image by this many voxels (edge values for
# 'nearest', cval for 'grid-constant') before computing cubic coefficients, so that the
# spline there interpolates a signal that really continues as the mode says.
_PREPAD = 12


def _map_index(index, n: int, mode: str):
    """Map integer indices (any range) into ``[0, n)`` under a boundary mode.

    Returns ``(index, inside)``; ``inside`` is None unless mode is 'constant', where it
    marks the taps that fall on the image (the others read cval).
    """
    if mode == "constant":
        inside = (index >= 0) & (index < n)
        return jnp.clip(index, 0, n - 1), inside
    if mode == "nearest":
        return jnp.clip(index, 0, n - 1), None
    if mode == "wrap":
        return jnp.mod(index, n), None
    if mode == "mirror":
        if n == 1:
            return jnp.zeros_like(index), None
        period = 2 * n - 2
        folded = jnp.mod(index, period)
        return jnp.where(folded >= n, period - folded, folded), None
    if mode == "reflect":
        period = 2 * n
        folded = jnp.mod(index, period)
        return jnp.where(folded >= n, period - 1 - folded, folded), None
    raise ValueError(f"unknown boundary mode {mode!r}; expected one of {sorted(MODES)}")


def _strides(spatial) -> list[int]:
    """Flat-index strides of the spatial axes of a C-ordered image."""
    return [int(np.prod(spatial[k + 1 :])) for k in range(len(spatial))]


def _cell_on_image(clamped, upper):
    """The first corner (int32) of the 2x..x2 cell that a point clamped onto the image
    reads in 'nearest' mode, and the point's position in it: the start is kept in
    ``[0, n - 2]`` so that every corner lies on the image (a point on the last voxel reads
    the cell before it at position 1). Needs ``n >= 2`` on every axis."""
    start = jnp.minimum(jnp.floor(clamped), upper - 1.0)
    return start.astype(jnp.int32), clamped - start


def _taps(x, order: int):
    """Per-axis interpolation taps: integer offsets, weights and weight derivatives."""
    if order == 0:
        base = jnp.round(x)
        one = jnp.ones_like(x)
        return base.astype(jnp.int32), [0], [one], [jnp.zeros_like(x)]
    base = jnp.floor(x)
    t = x - base
    base = base.astype(jnp.int32)
    if order == 1:
        return base, [0, 1], [1.0 - t, t], [-jnp.ones_like(t), jnp.ones_like(t)]
    # Cubic B-spline weights on taps floor-1 .. floor+2 and their derivatives in t.
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    weights = [s * s * s / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0, (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t3 / 6.0]
    derivatives = [-0.5 * s * s, 1.5 * t2 - 2.0 * t, -1.5 * t2 + t + 0.5, 0.5 * t2]
    return base, [-1, 0, 1, 2], weights, derivatives


def _interpolate(image, coords, order: int, mode: str, cval, with_gradient: bool):
    """Value of the interpolant at ``coords`` and its spatial gradient, one array per axis
    (each shaped as the value; see :func:`_directional`), or None without ``with_gradient``."""
    if with_gradient and order == 1 and mode in ("constant", "nearest"):
        return _interpolate_linear_patches(image, coords, mode, cval)
    ndim = coords.shape[-1]
    spatial = image.shape[:ndim]
    channels = image.shape[ndim:]
    flat = image.reshape((-1,) + channels)
    strides = _strides(spatial)

    per_axis = []
    for k in range(ndim):
        base, offsets, weights, derivatives = _taps(coords[..., k], order)
        axis_taps = []
        for offset, w, dw in zip(offsets, weights, derivatives):
            index, inside = _map_index(base + offset, spatial[k], mode)
            if inside is not None:
                w = jnp.where(inside, w, 0.0)
                dw = jnp.where(inside, dw, 0.0)
            axis_taps.append((index * strides[k], w, dw))
        per_axis.append(axis_taps)

    corners = []
    for corner in itertools.product(*per_axis):
        flat_index = corner[0][0]
        weight = corner[0][1]
        for k in range(1, ndim):
            flat_index = flat_index + corner[k][0]
            weight = weight * corner[k][1]
        dweights = []
        if with_gradient:
            for j in range(ndim):
                dweight = corner[j][2]
                for k in range(ndim):
                    if k != j:
                        dweight = dweight * corner[k][1]
                dweights.append(dweight)
        corners.append((flat_index, weight, dweights))

    # Where a tap reads cval its weight is zero here and the cval share is added back at
    # the end, so reads off the image never need a select on the gathered value.
    shifted = mode == "constant" and not (isinstance(cval, (int, float)) and cval == 0.0)
    voxels = []
    for flat_index, _, _ in corners:
        # Indices are in bounds by construction; 'fill' mode measured fastest on XLA CPU
        # (full-size warp: 0.60 s vs 0.64 s for promise_in_bounds, 0.78 s for clip).
        voxel = jnp.take(flat, flat_index, axis=0, mode="fill", fill_value=0)
        voxels.append(voxel - cval if shifted else voxel)

    expand = (lambda a: a[..., None]) if channels else (lambda a: a)

    def weighted_sum(weights):
        return sum(expand(w) * voxel for w, voxel in zip(weights, voxels))

    value = weighted_sum([weight for _, weight, _ in corners])
    if shifted:
        value = value + cval
    if not with_gradient:
        return _end_of_fusion(value), None
    gradient = tuple(weighted_sum([c[2][j] for c in corners]) for j in range(ndim))
    return _end_of_fusion((value, gradient))


def _interpolate_linear_patches(image, coords, mode: str, cval, with_gradient: bool = True):
    """Linear value and spatial gradient from ONE gather of a 2x..x2 patch per point.

    For ``mode`` 'constant' or 'nearest'. For 'constant' the image is padded by one voxel
    per side (cval), so every patch start can be clamped into range; a point whose patch
    lies wholly off the image reads cval. For 'nearest' the points are clamped onto the
    image and the patch starts into ``[0, n - 2]`` (a point on the last voxel reads the
    patch before it with weight 1 on its far side), so the gather reads the image itself:
    an edge-padded copy was fused into the gather loop, and leaving it out made the MNIST
    training step 4 % faster (median over 11 blocks of 50 steps run in turn, range
    -2 % to +10 %). One patch gather instead of ``2**d`` element gathers
    cuts XLA CPU's per-index work ``2**d``-fold: forward + coordinate gradient measured
    1.5x (160x192x224) to 1.7x (128 pairs of 28x28) faster. Values alone are another
    matter (:func:`_values_read_patches`). The gradient is None without ``with_gradient``.
    """
    ndim = coords.shape[-1]
    spatial = image.shape[:ndim]
    channels = image.shape[ndim:]
    lead = coords.shape[:-1]
    x = coords.reshape(-1, ndim)
    upper = jnp.asarray(spatial, x.dtype) - 1.0
    unpadded = mode == "nearest" and min(spatial) >= 2
    if mode == "nearest":
        # The interpolant is flat beyond the edge. On the last voxel itself the gradient
        # is the right derivative (zero), as reading an edge-padded image gives it.
        on_image = (x >= 0.0) & ((x < upper) if unpadded else (x <= upper))
        x = jnp.clip(x, 0.0, upper)
    shifted = mode == "constant" and cval != 0.0
    if unpadded:
        # Clamped into the image, a patch start needs no padding, and the gather reads
        # the image itself rather than a padded copy (which XLA fuses into the gather loop).
        start, t = _cell_on_image(x, upper)
        padded = image
    else:
        base = jnp.floor(x)
        t = x - base
        base = base.astype(jnp.int32)
        start = jnp.clip(base + 1, 0, jnp.asarray(spatial, jnp.int32))
        padded = jnp.pad(image - cval if shifted else image, [(1, 1)] * ndim + [(0, 0)] * len(channels), mode="edge" if mode == "nearest" else "constant")
    numbers = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(range(1, 1 + ndim + len(channels))), collapsed_slice_dims=(), start_index_map=tuple(range(ndim))
    )
    patch = jax.lax.gather(padded, start, numbers, slice_sizes=(2,) * ndim + channels, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)

    def reduce_corners(derivative_axis=None):
        p = patch
        for k in range(ndim):
            lo = jax.lax.index_in_dim(p, 0, axis=1, keepdims=False)
            hi = jax.lax.index_in_dim(p, 1, axis=1, keepdims=False)
            tk = t[:, k].reshape((-1,) + (1,) * (lo.ndim - 1))
            # (1 - t) lo + t hi is exact at both t = 0 and t = 1 (a point on the last voxel).
            p = hi - lo if k == derivative_axis else (1.0 - tk) * lo + tk * hi
        return p

    value = reduce_corners()
    gradient = tuple(reduce_corners(j) for j in range(ndim)) if with_gradient else None
    per_point = (-1,) + (1,) * len(channels)
    # Beyond the edge the nearest-mode interpolant is flat along that axis.
    if mode == "nearest":
        if with_gradient:
            gradient = tuple(jnp.where(on_image[:, j].reshape(per_point), g, 0.0) for j, g in enumerate(gradient))
    else:
        off = jnp.any((base < -1) | (base > jnp.asarray(spatial, jnp.int32) - 1), axis=-1).reshape(per_point)
        value = jnp.where(off, 0.0, value)
        if with_gradient:
            gradient = tuple(jnp.where(off, 0.0, g) for g in gradient)
    if shifted:
        value = value + cval
    value = value.reshape(lead + channels)
    if not with_gradient:
        return _end_of_fusion(value), None
    gradient = tuple(g.reshape(lead + channels) for g in gradient)
    return _end_of_fusion((value, gradient))


def _end_of_fusion(array):
    # Keeps the consumer (a loss, the next transform) out of the gather loop: measured on
    # a 160x192x224 warp on CPU, forward + coordinate gradient 0.87 s -> 0.64 s.
    return jax.lax.optimization_barrier(array)


@functools.lru_cache(maxsize=None)
def _cpu_vector_gathers() -> bool:
    """Whether XLA compiles CPU programs here for AVX-512, whose gather instructions LLVM
    uses to vectorize an element-gather loop (Linux ``/proc/cpuinfo`` flags, unless
    ``XLA_FLAGS`` caps ``--xla_cpu_max_isa`` below AVX512)."""
    cap = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    if cap and not cap.group(1).upper().startswith("AVX512"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        return False


def _values_read_patches(image, coords, order: int, mode: str) -> bool:
    """Whether values alone (no gradient) are read by one patch gather per point rather
    than ``2**d`` element gathers.

    Which is faster depends on the CPU. Forward only, median of interleaved calls, XLA
    CPU (jaxlib 0.10.2, 2 cores):

    - an AMD EPYC with AVX-512 (family 26): elements win for scalar images (256x256: 0.14
      against 0.21 ms; 128^3: 4.9 against 8.4 ms) and 2-D images of any channel count (16
      channels: 0.76 against 0.86 ms), patches for 3-D vector fields (64^3 x 2: 1.6 against
      3.9 ms; 128^3 x 3: 62 against 84 ms);
    - the same host with ``--xla_cpu_max_isa=AVX2``: patches win or tie everywhere (64^3 x
      2: 2.4 against 4.9 ms; 128^3: 8.3 against 12.2 ms; 256x256: 0.30 against 0.32 ms);
    - an earlier host (model not recorded; its peers' numbers suggest no AVX-512):
      patches in 2-D (256x256: 0.25 against 0.43 ms), elements for 3-D scalar images
      (64^3: 1.4 against 1.7 ms).

    So: patches for 3-D vector fields (each squaring of ``Velocity.exp``, each
    composition) everywhere, and for 2-D images unless the CPU has vector gathers.
    """
    if order != 1 or mode not in ("constant", "nearest"):
        return False
    ndim = coords.shape[-1]
    if ndim >= 3:
        return int(np.prod(image.shape[ndim:])) >= 2
    return not (jax.default_backend() == "cpu" and _cpu_vector_gathers())


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _sample(image, coords, order, mode, cval):
    return _values(image, coords, order, mode, cval)


def _values(image, coords, order, mode, cval):
    if _values_read_patches(image, coords, order, mode):
        return _interpolate_linear_patches(image, coords, mode, cval, with_gradient=False)[0]
    return _interpolate(image, coords, order, mode, cval, with_gradient=False)[0]


# From this many points (per call, so per pair under vmap) the image tangent's tap indices
# and weights are recomputed from the coordinates in the backward pass rather than kept
# (where the tangent is not read by _read_cell_corners, which always recomputes them):
# 2**d index and weight arrays per point per call, which in a scaling and squaring are most
# of what reverse mode keeps. Gradient of Velocity.exp (7 squarings) on CPU, 2 cores,
# interleaved calls, kept against recomputed: 160x192x224 median 12.9 against 10.1 s (best
# 9.90 against 9.83 s), 6064 against 3675 MiB of temporaries; 128^3 3.03 against 2.70 s,
# 1848 against 1120 MiB; below it recomputing costs more than it saves (96x112x128: 1.76
# against 1.85 s; 64^3: 325 against 368 ms).
_RECOMPUTE_TANGENT_WEIGHTS_POINTS = 2**21


@functools.partial(_sample.defjvp, symbolic_zeros=True)
def _sample_jvp(order, mode, cval, primals, tangents):
    image, coords = primals
    image_dot, coords_dot = tangents
    wants_coords = not isinstance(coords_dot, SymbolicZero) and order > 0
    wants_image = not isinstance(image_dot, SymbolicZero)
    recompute = wants_coords and wants_image and _recomputes_coordinate_gradient(image, coords, order, mode)
    if recompute:
        value, gradient = _values(image, coords, order, mode, cval), None
    else:
        value, gradient = _interpolate(image, coords, order, mode, cval, with_gradient=wants_coords)
    value_dot = jnp.zeros_like(value)
    if wants_image:
        # Linear in image_dot; cval is a constant, so the tangent image reads zero outside.
        value_dot = value_dot + _read_tangent(image_dot, coords, order, mode)
    if recompute:
        def coordinate_term(image, coords, coords_dot):
            return _directional(_interpolate(image, coords, order, mode, cval, with_gradient=True)[1], coords_dot)

        value_dot = value_dot + jax.checkpoint(coordinate_term)(image, coords, coords_dot)
    elif wants_coords:
        value_dot = value_dot + _directional(gradient, coords_dot)
    return value, value_dot


# A 3-D field read in 'nearest' mode at points it moves, both differentiated (scaling and
# squaring, composition), at fewer points than this per call: the coordinate gradient is
# computed in the backward pass, from a second read of the patches, instead of alongside
# the value and kept (3 arrays of the field's size per call). Gradient of a 7-squaring
# exp, CPU, 2 cores, interleaved calls, kept against recomputed: 32^3 23.1 against 18.3
# ms, 64^3 225 / 270 against 198 / 222 ms (two runs), 96x112x128 1.30 against 1.14 s,
# 128^3 2.03 / 2.07 against 1.89 / 1.84 s; composition at 64^3 and the 3-D GradICON step
# tied. Not above it (160x192x224, 6.9M points: 6.8 against 7.3 s), not in 2-D (96^2: 2.6
# against 3.1 ms), not for a warp of a fixed image (3x to 5x slower there).
_RECOMPUTE_COORDINATE_GRADIENT_MAX_POINTS = 2**22


def _reads_cells(image, coords, order: int, mode: str) -> bool:
    """Whether the image tangent is read through :func:`_nearest_mode_cells` (linear,
    'nearest', at least 2 voxels on every axis)."""
    return order == 1 and mode == "nearest" and min(image.shape[: coords.shape[-1]]) >= 2


def _recomputes_coordinate_gradient(image, coords, order: int, mode: str) -> bool:
    ndim = coords.shape[-1]
    return (
        _reads_cells(image, coords, order, mode)
        and ndim == 3
        and image.ndim > ndim
        and np.prod(coords.shape[:-1]) < _RECOMPUTE_COORDINATE_GRADIENT_MAX_POINTS
    )


def _read_tangent(image_dot, coords, order: int, mode: str):
    """The image tangent read at ``coords``: linear in ``image_dot``, and its transpose
    (a scatter-add) is the gradient with respect to the image.

    Element gathers, even where values alone read patches (:func:`_sample`): 2**d element
    scatters beat one patch scatter (128 pairs of 28x28x2: 0.86 against 1.24 ms; the
    gradient of a 7-squaring exp ran 0.76x to 0.93x as fast with patches from 96^2 to 64^3,
    1.12x at 96x112x128; an image gradient alone, 1.4x to 2x faster for scalar images).

    Linear reads in 'nearest' mode (every displacement field: scaling and squaring,
    composition, a network's refinement steps) keep, per point, only the flat index of
    the cell it falls in and its position in that cell; the backward pass rebuilds the
    2**d indices and weights from them and scatters all corners in one scatter-add. The
    general path keeps 2**d indices and 2**d weights per point and scatters corner by
    corner, summing the partial gradients. Gradient of a 7-squaring exp, CPU, 2 cores,
    interleaved calls, general against cell path: 64^3 283 against 248 ms (231 against 126
    MiB of temporaries), 128^3 2.36 against 1.95 s, 96x112x128 1.67 against 1.39 s,
    160x192x224 10.5 against 7.4 s; the 3-D GradICON training step, composition and 32^3
    tied.
    """
    if _reads_cells(image_dot, coords, order, mode):
        flat_start, fraction = _nearest_mode_cells(coords, image_dot.shape[: coords.shape[-1]])
        return jax.checkpoint(_read_cell_corners)(image_dot, flat_start, fraction)

    def read(image_dot, coords):
        return _interpolate(image_dot, coords, order, mode, 0.0, with_gradient=False)[0]

    if np.prod(coords.shape[:-1]) >= _RECOMPUTE_TANGENT_WEIGHTS_POINTS:
        read = jax.checkpoint(read)
    return read(image_dot, coords)


def _nearest_mode_cells(coords, spatial):
    """Per point, the flat index of the first corner of the cell a linear read in
    'nearest' mode takes its 2**d voxels from, and the point's position in that cell
    (:func:`_cell_on_image`; beyond the edge the interpolant is the edge value, so the
    point is clamped onto the image first). Returns ``(flat_start (...) int32, fraction
    (..., d) in [0, 1])``.
    """
    upper = jnp.asarray(spatial, coords.dtype) - 1.0
    start, fraction = _cell_on_image(jnp.clip(coords, 0.0, upper), upper)
    flat_start = sum(start[..., k] * stride for k, stride in enumerate(_strides(spatial)))
    return flat_start, fraction


def _read_cell_corners(image, flat_start, fraction):
    """Linear interpolation from :func:`_nearest_mode_cells`: one gather of the 2**d
    corners, ``(..., 2**d)`` indices, so that its transpose is one scatter-add."""
    ndim = fraction.shape[-1]
    spatial = image.shape[:ndim]
    channels = image.shape[ndim:]
    strides = _strides(spatial)
    offsets, weights = [], []
    for corner in itertools.product((0, 1), repeat=ndim):
        offsets.append(sum(c * stride for c, stride in zip(corner, strides)))
        weight = None
        for k, c in enumerate(corner):
            w = fraction[..., k] if c else 1.0 - fraction[..., k]
            weight = w if weight is None else weight * w
        weights.append(weight)
    index = flat_start[..., None] + jnp.asarray(offsets, jnp.int32)
    weights = jnp.stack(weights, axis=-1)
    # 'fill', not a promise of bounds: the integer cell start of a NaN coordinate is
    # undefined, and a checked gather (and its transpose) never leaves the image. The NaN
    # still reaches the gradient through the weights, as on every path.
    corners = jnp.take(image.reshape((-1,) + channels), index, axis=0, mode="fill", fill_value=0)
    if channels:
        weights = weights.reshape(weights.shape + (1,) * len(channels))
    return jnp.sum(weights * corners, axis=flat_start.ndim)


def _directional(gradient, coords_dot):
    """``sum_k gradient[k] * coords_dot[..., k]`` per channel, written out term by term.

    ``gradient`` holds one array per axis (shape ``coords.shape[:-1] + channels``), not a
    stack with the axes last: XLA CPU wrote such a stack (and read it back, axis by axis)
    with slow interleaving loops: 5 ms of kernel time per MNIST training step (128 pairs,
    both devices' threads summed). Without the stack the step ran 4 % and 7 % faster (two
    runs, median ratio of 50-step blocks run in turn).

    The sums are written out because ``jnp.sum(..., axis=-1)`` over the 2 or 3 coordinates
    (and the broadcast over channels) transpose into reductions over an axis of length
    2-3, which XLA CPU hands to its YNNPACK fusions, slowly: 3.5 ms a call for 128 MNIST
    pairs, a quarter of a training step. Written out, both directions are elementwise.

    Except for 3-D vector fields (a displacement read at displaced points: composition,
    a network's refinement step): there the per-channel terms slice the channel axis, and
    in the backward pass every slice becomes a pad of the whole field, which XLA CPU fused
    with the cotangent's expression into many large loops (the 3-D GradICON training step
    spent about half its time in them). Each coordinate's term broadcast over the channels
    instead: value and gradient of a composition at 64^3 / 128^3 took 58 / 549 ms against
    88 / 935, the 3-D GradICON step (2 pairs of 32^3) 275 against 366 ms, scaling and
    squaring tied (324 / 340 ms at 64^3). In 2-D the written-out form stays: the MNIST
    training step was 5-10 % slower broadcast (53 / 128 / 134 ms against 50 / 116 / 122
    for the diffusion / ICON / GradICON losses). Medians of interleaved calls, 2 cores."""
    lead = coords_dot.shape[:-1]
    if coords_dot.shape[-1] >= 3 and gradient[0].shape != lead:
        channels = gradient[0].shape[len(lead) :]
        if len(channels) == 1:
            # Copies concatenated rather than a broadcast: a broadcast's transpose sums
            # over the channel axis, a reduction XLA CPU also hands to YNNPACK, slowly;
            # a concatenation's is C slices added elementwise. The gradient of a
            # 7-squaring exp at 64^3: 304 against 281 ms.
            def spread(a):
                return jnp.concatenate([a[..., None]] * channels[0], axis=-1)
        else:
            def spread(a):
                return a.reshape(lead + (1,) * len(channels))
        return sum(g * spread(coords_dot[..., k]) for k, g in enumerate(gradient))
    per_channel = [g.reshape(lead + (-1,)) for g in gradient]  # channel axes as one, or 1
    terms = [sum(g[..., c] * coords_dot[..., k] for k, g in enumerate(per_channel)) for c in range(per_channel[0].shape[-1])]
    return jnp.stack(terms, axis=-1).reshape(gradient[0].shape)


def _cubic_prefilter_taps() -> list[float]:
    k = np.arange(-_PREFILTER_HALF_LENGTH, _PREFILTER_HALF_LENGTH + 1)
    # Python floats: weakly typed, so float32 images stay float32 and float64 ones get
    # float64 taps.
    return [float(t) for t in np.sqrt(3.0) * _CUBIC_POLE ** np.abs(k)]


def spline_prefilter(image, *, ndim: int | None = None, mode: str = "mirror"):
    """Cubic B-spline coefficients of ``image``, as ``scipy.ndimage.spline_filter(image,
    order=3, mode=...)`` with the scipy name of ``mode`` (see :data:`MODES`).

    The boundary mode says how the image continues past its ends while the coefficients
    are computed, as in scipy: ``'mirror'`` and ``'constant'`` mirror it about the edge
    voxels (scipy's ``spline_filter`` does so for 'grid-constant'), ``'reflect'`` and
    ``'nearest'`` about the edges, ``'wrap'`` repeats it. Sampling the coefficients with
    ``order=3, prefilter=False`` and the same mode interpolates the image (the spline
    passes through every voxel value) for every mode but 'constant', where the edge
    voxels also see cval. :func:`sample` with ``prefilter=True`` does what
    ``map_coordinates`` does: for 'nearest' and 'constant' it pads the image by 12 voxels
    (edge values, cval) before this filter, and interpolates in every mode.

    The filter is a separable FIR (the exact filter's impulse response cut where it falls
    below 1e-9), not the recursive one. It gives the exact coefficients of the extended
    signal; for 'reflect' and 'nearest' scipy's recursive initialisation is approximate
    on short axes (measured in float64 on random unit-variance data: about 4e-4 for 2
    voxels, 1e-4 for 3, 1e-5 for 4, 1e-6 for 5, 4e-8 for 6, below 1e-8 from 7 on).
    """
    if mode not in MODES:
        raise ValueError(f"unknown boundary mode {mode!r}; expected one of {sorted(MODES)}")
    ndim, _ = _checks.spatial_rank_of(jnp.ndim(image), ndim, name="image")
    image = jnp.asarray(image)
    if not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    taps = _cubic_prefilter_taps()
    half = _PREFILTER_HALF_LENGTH
    for axis in range(ndim):
        n = image.shape[axis]
        if n == 1:
            continue  # every extension of one voxel is constant: coefficient = value
        pad = [(0, 0)] * image.ndim
        pad[axis] = (half, half)
        padded = jnp.pad(image, pad, mode=_PREFILTER_EXTENSION[mode])
        out = None
        for i, tap in enumerate(taps):
            term = tap * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            out = term if out is None else out + term
        image = out
    return image


def sample(image, coords, *, order: int = 1, mode: str = "constant", cval: float = 0.0, prefilter: bool = True):
    """Interpolate ``image`` at index coordinates ``coords``.

    Args:
      image: ``(*spatial)`` scalar image or ``(*spatial, C)`` channels-last image; the
        spatial rank is ``coords.shape[-1]``.
      coords: ``(..., d)`` index coordinates, float.
      order: 0 nearest (exact for integer labels, dtype kept), 1 linear, 3 cubic B-spline.
      mode: boundary handling, one of :data:`MODES`.
      cval: value beyond the edge for ``mode='constant'``.
      prefilter: for ``order=3``, turn voxel values into spline coefficients first
        (:func:`spline_prefilter` with ``mode``; for 'nearest' and 'constant' the image
        is padded by 12 voxels of edge value or cval first), so that the result is
        ``scipy.ndimage.map_coordinates(..., order=3, prefilter=True)`` with the scipy
        name of the mode (in float32 to about 1e-6 of unit-variance images; up to 6e-6
        for 'nearest' and 'constant', whose coordinates, shifted by 12, round more
        coarsely); pass False when ``image`` already holds coefficients (B-spline
        transforms do).

    Returns:
      ``(...)`` or ``(..., C)`` values.

    >>> image = jnp.arange(12.0).reshape(3, 4)
    >>> float(sample(image, jnp.array([1.5, 2.0])))
    8.0
    """
    d = _checks.check_points(coords, name="coords")
    _checks.spatial_rank_of(jnp.ndim(image), d, name="image")
    _checks.check_not_empty(image, name="image")
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic); got {order}")
    if mode not in MODES:
        raise ValueError(f"unknown boundary mode {mode!r}; expected one of {sorted(MODES)}")
    return _sample_compiled(image, coords, order=order, mode=mode, cval=float(cval), prefilter=bool(prefilter))


# Compiled once per shape and option set, so that eager calls run as one program rather
# than hundreds of small dispatches (under an outer jit this is simply inlined).
@functools.partial(jax.jit, static_argnames=("order", "mode", "cval", "prefilter"))
def _sample_compiled(image, coords, *, order, mode, cval, prefilter):
    if order == 0:
        # Labels stay labels: gather without arithmetic on the values.
        return _sample_nearest(image, coords, mode, cval)
    if not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    coords = coords.astype(jnp.promote_types(coords.dtype, image.dtype))
    if order == 3 and prefilter:
        ndim = coords.shape[-1]
        if mode in ("nearest", "constant"):
            # As scipy's map_coordinates: pad first, so that near the edge the spline
            # interpolates the edge value (cval) continued outside, then read the
            # padded coefficients at shifted coordinates.
            pad = [(_PREPAD, _PREPAD)] * ndim + [(0, 0)] * (image.ndim - ndim)
            if mode == "nearest":
                image = jnp.pad(image, pad, mode="edge")
            else:
                image = jnp.pad(image, pad, mode="constant", constant_values=cval)
            coords = coords + _PREPAD
        image = spline_prefilter(image, ndim=ndim, mode=mode)
    return _sample(image, coords, order, mode, cval)


def _sample_nearest(image, coords, mode, cval):
    ndim = coords.shape[-1]
    spatial = image.shape[:ndim]
    flat = image.reshape((-1,) + image.shape[ndim:])
    coords = jax.lax.stop_gradient(coords)
    flat_index = 0
    inside = None
    for k, stride in enumerate(_strides(spatial)):
        index, valid = _map_index(jnp.round(coords[..., k]).astype(jnp.int32), spatial[k], mode)
        flat_index = flat_index + index * stride
        if valid is not None:
            inside = valid if inside is None else inside & valid
    values = jnp.take(flat, flat_index, axis=0, mode="fill", fill_value=0)
    if inside is not None:
        if image.ndim > ndim:
            inside = inside[..., None]
        values = jnp.where(inside, values, jnp.asarray(cval, dtype=values.dtype))
    return values
