"""Finite differences in world units, for any spatial rank.

One stencil serves 2-D and 3-D: each function loops over spatial axes, never over ranks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreg import _checks
from jaxreg.grid import Grid, cotangent_summed_apart, points_matmul

__all__ = [
    "spacing_vector",
    "forward_difference",
    "central_difference",
    "spatial_gradient",
    "jacobian_of_map",
    "jacobian_determinant_of_map",
    "determinant",
]


def spacing_vector(spacing, ndim: int):
    """Voxel size per axis as a length-``ndim`` array; takes a scalar, a sequence, a
    (possibly traced) array or a :class:`~jaxreg.grid.Grid`."""
    if isinstance(spacing, Grid):
        spacing = spacing.spacing
    spacing = jnp.asarray(spacing, dtype=jnp.float32)
    if spacing.ndim > 1 or (spacing.ndim == 1 and spacing.shape[0] not in (1, ndim)):
        raise ValueError(f"spacing needs one value or one per spatial axis ({ndim}); got shape {spacing.shape}")
    return jnp.broadcast_to(spacing, (ndim,))


def forward_difference(x, axis: int, spacing: float = 1.0):
    """``(x[i+1] - x[i]) / spacing`` along ``axis``; one element shorter there."""
    n = x.shape[axis]
    return (jax.lax.slice_in_dim(x, 1, n, axis=axis) - jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)) / spacing


def central_difference(x, axis: int, spacing: float = 1.0):
    """Central differences along ``axis``, one-sided at the two ends (as ``numpy.gradient``).

    Same shape as ``x``. An axis of length 1 has no derivative and gives zeros.
    """
    n = x.shape[axis]
    if n == 1:
        return jnp.zeros_like(x)
    fwd = forward_difference(x, axis, spacing)
    first = jax.lax.slice_in_dim(fwd, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(fwd, n - 2, n - 1, axis=axis)
    if n == 2:
        return jnp.concatenate([first, last], axis=axis)
    centre = (jax.lax.slice_in_dim(x, 2, n, axis=axis) - jax.lax.slice_in_dim(x, 0, n - 2, axis=axis)) / (
        2.0 * spacing
    )
    return jnp.concatenate([first, centre, last], axis=axis)


def spatial_gradient(x, spacing=1.0, *, ndim: int | None = None):
    """Gradient of a scalar or channels-last array over its spatial axes.

    ``x`` is ``(*spatial)`` or ``(*spatial, C)``; returns ``(*x.shape, d)`` whose last axis
    is the derivative along spatial axis ``k`` divided by ``spacing[k]``.
    """
    ndim = x.ndim if ndim is None else ndim
    _checks.spatial_rank_of(x.ndim, ndim, name="x")
    spacing = spacing_vector(spacing, ndim)
    return jnp.stack([central_difference(x, k, spacing[k]) for k in range(ndim)], axis=-1)


def jacobian_of_map(mapped_points, grid: Grid):
    """Jacobian ``d phi / d x`` of a map sampled on ``grid``, shape ``(*shape, d, d)``.

    ``mapped_points[i] = phi(x_i)`` with ``x_i`` the world points of ``grid``. Differences
    are taken along index axes and turned into world derivatives with the inverse of the
    grid's linear part, so oblique and anisotropic grids are handled exactly.
    """
    _checks.check_field(mapped_points, grid.ndim, name="mapped points")
    if tuple(mapped_points.shape[:-1]) != grid.shape:
        raise ValueError(
            f"mapped points have spatial shape {tuple(mapped_points.shape[:-1])}, grid has {grid.shape}"
        )
    mapped_points = cotangent_summed_apart(mapped_points)
    d_index = jnp.stack([central_difference(mapped_points, k) for k in range(grid.ndim)], axis=-1)
    inverse_linear = jnp.linalg.inv(jnp.asarray(grid.linear, dtype=mapped_points.dtype))
    return points_matmul(d_index, inverse_linear)


def determinant(matrices):
    """Determinant of ``(..., d, d)`` matrices, written out for d <= 3 (cheap, fusible)."""
    d = matrices.shape[-1]
    m = matrices
    if d == 1:
        return m[..., 0, 0]
    if d == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    if d == 3:
        return (
            m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0])
        )
    return jnp.linalg.det(m)


def jacobian_determinant_of_map(mapped_points, grid: Grid):
    """``det(d phi / d x)`` at every voxel of ``grid``; shape ``grid.shape``."""
    return determinant(jacobian_of_map(mapped_points, grid))
