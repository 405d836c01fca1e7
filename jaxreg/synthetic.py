"""Built-in data: synthetic images with labels and random smooth warps, for any rank.

Used by examples, tests and the demo so that nothing has to be downloaded.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import filters
from jaxreg.grid import PRECISE, Grid
from jaxreg.sampling import sample
from jaxreg.transforms import Velocity

__all__ = ["blobs", "random_velocity"]


def blobs(key, shape: Sequence[int], *, labels: int = 4, radius: float = 0.22, smoothness: float = 1.0):
    """An image of ``labels`` overlapping ellipsoids of distinct intensity, and its label map.

    Returns ``(image, label_map)``: ``image`` float32 in ``[0, 1]`` with a little texture,
    ``label_map`` int32 with 0 as background and ``1..labels`` as the ellipsoids (later
    ones drawn on top). Sizes and positions are fractions of the field of view.
    """
    shape = tuple(int(n) for n in shape)
    if labels < 1:
        raise ValueError(f"labels must be >= 1; got {labels}")
    return _blobs(key, shape, labels=int(labels), radius=float(radius), smoothness=float(smoothness))


@functools.partial(jax.jit, static_argnames=("shape", "labels", "radius", "smoothness"))
def _blobs(key, shape, *, labels, radius, smoothness):
    ndim = len(shape)
    grid = Grid.from_spacing(shape, spacing=[1.0 / (n - 1) if n > 1 else 1.0 for n in shape])
    points = grid.points()  # unit cube
    k_centre, k_axes, k_texture = jax.random.split(key, 3)
    centres = jax.random.uniform(k_centre, (labels, ndim), minval=0.3, maxval=0.7)
    semi_axes = radius * jax.random.uniform(k_axes, (labels, ndim), minval=0.5, maxval=1.2)
    # Largest first, so that later (smaller) ellipsoids are not buried under earlier ones.
    semi_axes = semi_axes[jnp.argsort(-jnp.prod(semi_axes, axis=1))]
    label_map = jnp.zeros(shape, jnp.int32)
    for i in range(labels):
        # Written out: a sum over the last axis (length ndim) is a reduction that XLA CPU
        # hands to its YNNPACK fusions, slowly (a third of drawing a 3-D training batch).
        inside = sum(((points[..., k] - centres[i, k]) / semi_axes[i, k]) ** 2 for k in range(ndim)) <= 1.0
        label_map = jnp.where(inside, i + 1, label_map)
    intensities = jnp.linspace(0.35, 1.0, labels + 1).at[0].set(0.0)
    image = intensities[label_map]
    # Products, not shifted sums: XLA fused shifted sums, with the random texture they
    # smooth, into the gathers of the warp that reads the image, recomputing them per corner.
    texture = 0.05 * filters.gaussian_smooth(jax.random.normal(k_texture, shape), 1.0, method="products")
    image = filters.gaussian_smooth(image, smoothness, method="products") + texture
    return jnp.clip(image, 0.0, 1.0).astype(jnp.float32), label_map


@functools.lru_cache(maxsize=64)
def _cubic_upsampling(coarse: int, fine: int):
    """``(fine, coarse)`` matrix of cubic B-spline interpolation ('mirror' mode, prefiltered)
    of ``coarse`` samples at ``fine`` evenly spaced points from the first to the last: the
    1-D factor of :func:`jaxreg.sampling.sample` at the points of a regular grid, which is
    separable there (a tensor product of one such matrix per axis)."""
    positions = np.arange(fine, dtype=np.float64) * ((coarse - 1) / max(fine - 1, 1))
    basis = np.eye(coarse, dtype=np.float32)  # a 1-D image with one channel per coarse sample
    with jax.ensure_compile_time_eval():
        matrix = sample(jnp.asarray(basis), jnp.asarray(positions[:, None], jnp.float32), order=3, mode="mirror")
    return np.asarray(matrix, np.float32)


def random_velocity(key, grid: Grid, *, amplitude: float, smoothness: float = 4.0, steps: int = 7) -> Velocity:
    """A random smooth stationary velocity field whose largest component is ``amplitude`` mm.

    ``smoothness`` is the distance between independent random values, in voxels; ``exp`` of the result is a
    diffeomorphism, handy as a known warp to register back.
    """
    # Cubic upsampling of coarse noise: smooth everywhere, unlike smoothed fine noise,
    # whose boundary padding makes it large at the edges and nearly still in the centre.
    # One small matrix product per axis, where sample() at every point read 4**d taps:
    # drawing a batch of 2 pairs of 32^3 (examples/gradicon_3d.py) took 27 -> 10 ms.
    coarse_shape = tuple(max(2, int(round((n - 1) / smoothness)) + 1) for n in grid.shape)
    noise = jax.random.normal(key, coarse_shape + (grid.ndim,))
    field = noise
    for axis, (c, n) in enumerate(zip(coarse_shape, grid.shape)):
        field = jnp.moveaxis(jnp.tensordot(_cubic_upsampling(c, n), field, axes=([1], [axis]), precision=PRECISE), 0, axis)
    field = amplitude * field / jnp.maximum(jnp.max(jnp.abs(field)), 1e-12)
    return Velocity(field, grid.affine, steps=steps)
