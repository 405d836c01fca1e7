"""Regularizers of a displacement field, as factories of pure functions.

Every factory takes its settings (keyword-only) and returns

    ``f(displacement, spacing=1.0) -> scalar``

for ONE displacement field of shape ``(*spatial, d)`` (vector last, ``d`` = number of
spatial axes) in world units (mm). ``spacing`` is the voxel size: a scalar, one value per
axis, a (possibly traced) array, or a :class:`~jaxreg.grid.Grid`. Derivatives are finite
differences in mm, so the value of an energy does not depend on the resolution the field is
sampled at. Batches come from ``jax.vmap`` (``spacing`` may be batched too).

With a :class:`~jaxreg.grid.Grid`, ``diffusion``, ``bending``, ``total_variation`` use the
voxel size along each index axis (the grid's column norms). That is exact for grids whose
axes are orthogonal (any rotation, any anisotropy) because those energies are invariant to a
rotation of the frame, except anisotropic total variation, which is measured along the
voxel axes by definition. ``jacobian_folding`` uses the full voxel-to-world matrix, so its
determinant is exact on oblique and sheared grids too.

Normalization: each energy is a mean over voxel positions where its stencil is defined (no
padding, so the boundary neither adds spurious terms nor dilutes the value) and a sum over
vector components and derivative terms. A linear field ``u(x) = A x`` therefore has
diffusion energy exactly ``||A||_F**2`` and bending energy 0, whatever the grid size.

>>> import jax.numpy as jnp
>>> from jaxreg.grid import Grid
>>> x = Grid.from_spacing((8, 6), spacing=(2.0, 0.5)).points()
>>> u = x @ jnp.array([[0.1, 0.2], [0.0, -0.3]]).T
>>> round(float(diffusion()(u, spacing=(2.0, 0.5))), 5)
0.14
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxreg import _checks, differential
from jaxreg.grid import Grid, points_matmul

__all__ = [
    "diffusion",
    "bending",
    "total_variation",
    "sparsity",
    "jacobian_folding",
    "REGULARIZERS",
]


def _prepare(displacement, spacing):
    """Validate a field at trace time; return it, its rank and the voxel size per axis."""
    u = jnp.asarray(displacement)
    d = _checks.check_field(u, name="displacement")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        raise TypeError(f"displacement must be floating point; got dtype {u.dtype}")
    if isinstance(spacing, Grid) and spacing.shape != tuple(u.shape[:-1]):
        raise ValueError(
            f"displacement has spatial shape {tuple(u.shape[:-1])} but the grid has shape {spacing.shape}"
        )
    h = differential.spacing_vector(spacing, d)
    return u, d, h


def _abs(x):
    # jnp.abs has derivative 1 at 0; x * sign(x) has 0 there, the subgradient that keeps an
    # optimizer at rest at the minimum (a zero field, a constant field).
    return x * jnp.sign(x)


def _zero(u, h):
    return jnp.zeros((), jnp.result_type(u.dtype, h.dtype))


def _safe_sqrt(s):
    # sqrt'(0) is infinite; the double `where` keeps both the value and its gradient finite
    # (gradient 0) where s == 0, e.g. for a zero field with eps == 0.
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _sum_of_axis_means(displacement, spacing, penalty):
    """``sum_i mean_x sum_k penalty(du_k/dx_i)`` with forward differences in mm; axes of
    length 1 carry no derivative and contribute 0."""
    u, d, h = _prepare(displacement, spacing)
    total = _zero(u, h)
    for i in range(d):
        if u.shape[i] < 2:
            continue
        du = differential.forward_difference(u, i, h[i])
        total = total + jnp.mean(jnp.sum(penalty(du), axis=-1))
    return total


def diffusion():
    """Diffusion (membrane) energy: ``sum_i mean_x sum_k (du_k/dx_i)**2``.

    Forward differences in mm along each spatial axis ``i``; the squared differences of all
    components are summed and averaged over that axis's ``n_i - 1`` valid positions, then
    the per-axis averages are summed. Axes of length 1 carry no derivative and contribute 0.
    A linear field ``u(x) = A x`` gives exactly ``||A||_F**2``.
    """

    def energy(displacement, spacing=1.0):
        return _sum_of_axis_means(displacement, spacing, jnp.square)

    return energy


def bending():
    """Thin-plate bending energy: ``sum_k [sum_i (d2u_k/dx_i2)**2 + 2 sum_{i<j} (d2u_k/dx_i dx_j)**2]``.

    Pure second derivatives are the second central difference ``(u[i+1] - 2u[i] + u[i-1]) / h**2``
    (``n_i - 2`` valid positions, axes shorter than 3 skipped); mixed derivatives are forward
    differences along ``i`` then ``j`` (``(n_i - 1)(n_j - 1)`` positions). Each term is
    averaged over its own valid positions, then the terms are summed. Both stencils are
    exact for quadratics, so ``u_k(x) = x^T H_k x / 2`` gives exactly ``sum_k ||H_k||_F**2``
    and any affine field gives 0.
    """

    def energy(displacement, spacing=1.0):
        u, d, h = _prepare(displacement, spacing)
        total = _zero(u, h)
        first = [
            differential.forward_difference(u, i, h[i]) if u.shape[i] >= 2 else None for i in range(d)
        ]
        for i in range(d):
            if u.shape[i] >= 3:
                dii = differential.forward_difference(first[i], i, h[i])
                total = total + jnp.mean(jnp.sum(dii**2, axis=-1))
            for j in range(i + 1, d):
                if first[i] is None or u.shape[j] < 2:
                    continue
                dij = differential.forward_difference(first[i], j, h[j])
                total = total + 2.0 * jnp.mean(jnp.sum(dij**2, axis=-1))
        return total

    return energy


def total_variation(*, isotropic: bool = True, eps: float = 1e-6):
    """Total variation of each component of the field.

    ``isotropic=True``: ``mean_x sum_k sqrt(sum_i (du_k/dx_i)**2 + eps)``, with forward
    differences in mm taken on the common block of voxels where all of them exist (the first
    ``n_i - 1`` positions along every axis longer than 1). ``eps`` smooths the kink at zero
    gradient (a zero field gives ``d * sqrt(eps)``, not 0); ``eps=0`` is allowed and still
    has finite gradients.

    ``isotropic=False``: ``sum_i mean_x sum_k |du_k/dx_i|``, normalized per axis like
    :func:`diffusion`; ``eps`` is unused.

    For ``u(x) = A x`` the isotropic value is ``sum_k sqrt(sum_i A_ki**2 + eps)`` and the
    anisotropic one ``sum_ki |A_ki|``.
    """
    _checks.check_nonnegative(eps, name="eps")
    eps = float(eps)

    def isotropic_energy(displacement, spacing=1.0):
        u, d, h = _prepare(displacement, spacing)
        active = [i for i in range(d) if u.shape[i] >= 2]
        block = tuple(slice(0, u.shape[i] - 1) if i in active else slice(None) for i in range(d))
        squared = jnp.zeros(tuple(u[block].shape), jnp.result_type(u.dtype, h.dtype))
        for i in active:
            du = differential.forward_difference(u, i, h[i])
            # Along axis i the difference is already n_i - 1 long; crop only the others.
            crop = tuple(slice(None) if j == i else block[j] for j in range(d))
            squared = squared + du[crop] ** 2
        return jnp.mean(jnp.sum(_safe_sqrt(squared + eps), axis=-1))

    def anisotropic_energy(displacement, spacing=1.0):
        return _sum_of_axis_means(displacement, spacing, _abs)

    return isotropic_energy if isotropic else anisotropic_energy


def sparsity(*, norm: str = "l1"):
    """Magnitude of the displacement itself: ``mean_x sum_k |u_k|`` (``"l1"``) or
    ``mean_x sum_k u_k**2`` (``"l2"``), in mm (mm²). ``spacing`` is accepted for a uniform
    signature and unused."""
    if norm not in ("l1", "l2"):
        raise ValueError(f'norm must be "l1" or "l2"; got {norm!r}')

    def energy(displacement, spacing=1.0):
        u, _, _ = _prepare(displacement, spacing)
        per_voxel = jnp.sum(_abs(u) if norm == "l1" else u**2, axis=-1)
        return jnp.mean(per_voxel)

    return energy


def _displacement_jacobian(u, spacing, h):
    """``du_k/dx_i`` in world units, shape ``(*spatial, d, d)``, central differences."""
    d = u.shape[-1]
    if isinstance(spacing, Grid):
        # Differences along index axes mapped through the inverse voxel-to-world matrix:
        # exact for oblique and sheared grids, where per-axis spacing is not.
        d_index = jnp.stack([differential.central_difference(u, i) for i in range(d)], axis=-1)
        inverse_linear = jnp.linalg.inv(jnp.asarray(spacing.linear, dtype=jnp.float32))
        return points_matmul(d_index, inverse_linear.astype(jnp.result_type(d_index.dtype, jnp.float32)))
    return differential.spatial_gradient(u, h, ndim=d)


def jacobian_folding(*, margin: float = 0.0):
    """Folding penalty: ``mean_x relu(margin - det(I + du/dx))``.

    The Jacobian of ``x -> x + u(x)`` uses central differences in mm (one-sided at the
    borders, as :func:`jaxreg.differential.central_difference`), so it is exact for affine
    fields at every voxel. ``margin > 0`` also penalizes strong compression (determinants
    below ``margin``). A field with ``det = -1`` everywhere gives ``margin + 1``.
    """
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite; got {margin}")

    def energy(displacement, spacing=1.0):
        u, d, h = _prepare(displacement, spacing)
        jac = _displacement_jacobian(u, spacing, h) + jnp.eye(d, dtype=u.dtype)
        det = differential.determinant(jac)
        return jnp.mean(jax.nn.relu(margin - det))

    return energy


REGULARIZERS = {
    "diffusion": diffusion,
    "bending": bending,
    "total_variation": total_variation,
    "sparsity": sparsity,
    "jacobian_folding": jacobian_folding,
}
