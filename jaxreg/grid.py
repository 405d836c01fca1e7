"""Physical space: voxel lattices (`Grid`) and images that know where they are (`Image`).

A grid is a shape and a ``(d+1, d+1)`` voxel-to-world matrix, nibabel's ``img.affine``.
Index coordinates are ``(..., d)`` arrays whose component ``k`` indexes array axis ``k``;
world coordinates are ``(..., d)`` too. Plain arrays get the identity matrix, so for them
index and world coordinates coincide and nobody has to think about physical space.

Both classes are pytrees: the matrix (and the image data) are leaves, the shape is static,
so grids and images pass through ``jit``, ``vmap`` and ``grad`` like arrays do.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import _checks

__all__ = ["Grid", "Image", "as_image", "identity_affine"]

# GPUs multiply float32 matrices in TF32 (a 10-bit mantissa) unless told otherwise: a
# point 100 mm from the origin then moves by up to ~0.1 mm, an affine Jacobian determinant
# is off by 3e-4 to 9e-4, a Gaussian smoothing by 3e-4 of its range (the test suite on an
# H200). Geometry and filters ask for full float32; the networks keep the backend's default.
PRECISE = jax.lax.Precision.HIGHEST


def precise_matmul(a, b):
    """``a @ b`` in full float32 precision on every backend (:data:`PRECISE`); numpy stays numpy."""
    if isinstance(a, (np.ndarray, np.generic)) and isinstance(b, (np.ndarray, np.generic)):
        return a @ b
    return jnp.matmul(a, b, precision=PRECISE)


# Rows of points multiplied per block in points_matmul.
_POINTS_PER_BLOCK = 16


def points_matmul(points, matrix):
    """``points @ matrix`` for many ``(..., d)`` points and a small ``(d, e)`` matrix, in
    full float32 (:func:`precise_matmul`), as blocks of up to 16 points against
    ``kron(I, matrix)``: the same sums (plus exact zeros), but a product XLA CPU's matrix
    library runs fast. With d = e = 3, 2 cores: 1.0 against 0.18 ms for 65,536 points, 255
    against 149 ms for 160x192x224x3 (the Jacobian of a field); the 3-D GradICON step,
    whose Jacobians and cotangent identities take 12 such products, 192 -> 186 ms median
    (bit-identical parameters). Written out elementwise instead, the Jacobian fused into
    its consumers and that step took 194 against 183 ms.

    The zeros have a cost only for non-finite input: ``0 * inf`` is NaN, so an infinite
    or NaN coordinate makes the other points of its block (the up to 16 rows it shares a
    product with) NaN too."""
    points = jnp.asarray(points)
    d, e = matrix.shape
    count = math.prod(points.shape[:-1])
    block = math.gcd(count, _POINTS_PER_BLOCK)  # the largest block that divides the points
    if block == 1:
        return precise_matmul(points, matrix)
    blocked = precise_matmul(points.reshape(-1, block * d), jnp.kron(jnp.eye(block, dtype=matrix.dtype), matrix))
    return blocked.reshape(points.shape[:-1] + (e,))


# apply_linear passes 3-D points through cotangent_summed_apart up to this many per call
# (per pair under vmap): a world-to-index map of points read from a field gets the same
# fused-cotangent treatment as jacobian_of_map. 3-D GradICON step (32^3, batch 2), 20
# interleaved calls, parameters bit-identical: 201.7 against 232.2 ms median (213.5
# against 229.5 in a second run). Not in 2-D (the MNIST diffusion step 45.8 -> 55.7 ms:
# there the product with a 2x2 I is a slow YNNPACK call over 100k points), not above it
# (the product costs a pass of its own over a large field; 160x192x224: 67 ms), and
# classical 3-D registration at 40^3 tied (SVF, greedy, SyN: 0.99x to 1.04x).
_SUM_APART_MAX_POINTS = 2**16


@jax.custom_jvp
def cotangent_summed_apart(points):
    """``points`` unchanged, at no cost; but under differentiation their tangent, and so
    in reverse mode their cotangent, passes through a product with the identity matrix,
    which XLA computes as an array of its own. The cotangent of the points a finite-
    difference Jacobian reads is a sum of one term per difference (18 in 3-D); without
    this XLA CPU fuses that sum into whatever consumes the cotangent next, and where the
    points were read from a displacement field (a composition, as in the GradICON loss)
    that is the gather's transpose, whose 2**d-corner updates then compute the sum once
    per corner. 3-D GradICON training step (``examples/gradicon_3d.py``: 32^3, batch 2),
    2 cores, 20 interleaved calls: 211.7 against 243.5 ms median (200 against 229 ms
    best), with bit-identical parameters after the step."""
    return points


@cotangent_summed_apart.defjvp
def _cotangent_summed_apart_jvp(primals, tangents):
    (points,), (tangent,) = primals, tangents
    eye = jnp.eye(points.shape[-1], dtype=points.dtype)
    return points, points_matmul(tangent, eye)


def identity_affine(ndim: int) -> np.ndarray:
    return np.eye(ndim + 1, dtype=np.float32)


def _check_affine(affine, ndim: int, *, name: str = "affine"):
    shape = jnp.shape(affine)
    if shape != (ndim + 1, ndim + 1):
        raise ValueError(
            f"{name} must be a ({ndim + 1}, {ndim + 1}) voxel-to-world matrix for {ndim}-D data; "
            f"got shape {shape}"
        )


def _inverse(affine):
    # Concrete matrices are inverted in float64 on the host: world<->index round trips
    # then lose nothing to a float32 inverse.
    if isinstance(affine, np.ndarray):
        return np.linalg.inv(affine.astype(np.float64)).astype(np.float32)
    return jnp.linalg.inv(affine)


@jax.tree_util.register_pytree_node_class
class Grid:
    """A voxel lattice in world space: ``shape`` (static) and ``affine`` (voxel -> world).

    >>> g = Grid((4, 5), affine=np.diag([2.0, 3.0, 1.0]))
    >>> g.points()[1, 2].tolist()
    [2.0, 6.0]
    >>> g.spacing.tolist()
    [2.0, 3.0]
    """

    def __init__(self, shape: Sequence[int], affine=None):
        shape = tuple(int(n) for n in shape)
        if len(shape) == 0:
            raise ValueError("a grid needs at least one spatial axis; got shape ()")
        if any(n < 1 for n in shape):
            raise ValueError(f"a grid needs a positive size along every axis; got shape {shape}")
        ndim = len(shape)
        if affine is None:
            affine = identity_affine(ndim)
        elif isinstance(affine, (list, tuple)) or (
            isinstance(affine, np.ndarray) and affine.dtype != np.float32
        ):
            affine = np.asarray(affine, dtype=np.float32)
        _check_affine(affine, ndim)
        self.shape = shape
        self.affine = affine

    @classmethod
    def from_spacing(cls, shape: Sequence[int], spacing=1.0, origin=0.0) -> "Grid":
        """An axis-aligned grid with the given voxel size and world position of voxel 0."""
        ndim = len(shape)
        spacing = _checks.per_axis(spacing, ndim, name="spacing")
        _checks.check_positive(spacing, name="spacing")
        origin = _checks.per_axis(origin, ndim, name="origin")
        affine = np.eye(ndim + 1, dtype=np.float32)
        affine[:ndim, :ndim] = np.diag(spacing)
        affine[:ndim, ndim] = origin
        return cls(shape, affine)

    # -- pytree -------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.affine,), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        grid = object.__new__(cls)
        grid.shape = shape
        (grid.affine,) = children
        return grid

    # -- geometry -----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def linear(self):
        """The ``(d, d)`` part of the matrix: column ``k`` is the world step of index axis ``k``."""
        return self.affine[: self.ndim, : self.ndim]

    @property
    def origin(self):
        """World position of voxel ``(0, ..., 0)``."""
        return self.affine[: self.ndim, self.ndim]

    @property
    def spacing(self):
        """Voxel size along each index axis (world length of each column)."""
        xp = np if isinstance(self.affine, np.ndarray) else jnp
        return xp.sqrt(xp.sum(self.linear**2, axis=0))

    def index_points(self) -> jax.Array:
        """Index coordinates of every voxel, shape ``(*shape, d)``, float32."""
        axes = [jnp.arange(n, dtype=jnp.float32) for n in self.shape]
        return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)

    def points(self) -> jax.Array:
        """World coordinates of every voxel centre, shape ``(*shape, d)``."""
        return self.index_to_world(self.index_points())

    def index_to_world(self, index):
        _checks.check_points(index, self.ndim, name="index coordinates")
        return apply_affine(self.affine, index)

    def world_to_index(self, points):
        _checks.check_points(points, self.ndim, name="world points")
        return apply_affine(_inverse(self.affine), points)

    def scaled(self, factor) -> "Grid":
        """A grid over the same extent with voxels ``factor`` times larger (or smaller).

        Voxel centres of the new grid sit at the centres of the blocks of old voxels they
        cover, so a grid downsampled by 2 and upsampled by 2 is the original one.
        """
        factors = _checks.per_axis(factor, self.ndim, name="factor")
        _checks.check_positive(factors, name="factor")
        shape = tuple(max(1, int(round(n / f))) for n, f in zip(self.shape, factors))
        scale = np.eye(self.ndim + 1, dtype=np.float32)
        scale[: self.ndim, : self.ndim] = np.diag(factors)
        scale[: self.ndim, self.ndim] = [(f - 1.0) / 2.0 for f in factors]
        xp = np if isinstance(self.affine, np.ndarray) else jnp
        return Grid(shape, xp.asarray(precise_matmul(self.affine, scale), dtype=xp.float32))

    def __repr__(self) -> str:
        return f"Grid(shape={self.shape}, spacing={np.round(np.asarray(self.spacing), 4).tolist()})"


def apply_linear(linear, vectors, offset=None):
    """``vectors @ linear.T (+ offset)`` for ``(..., d)`` vectors and a ``(d, d)`` matrix."""
    # Each output coordinate as an explicit sum of d products, stacked: XLA fuses it into
    # one pass over the points, where a (N, d) x (d, d) dot with tiny d would be a
    # separate, slower library call on CPU. Broadcasting a (..., 1) column over the d
    # outputs instead would transpose, in a gradient, into reductions over an axis of
    # length d, which XLA CPU runs slowly in its YNNPACK fusions (a sixth of an MNIST
    # training step).
    d = vectors.shape[-1]
    host = all(isinstance(x, (np.ndarray, np.generic)) for x in (vectors, linear, 0.0 if offset is None else offset))
    if not host and d == 3 and math.prod(vectors.shape[:-1]) <= _SUM_APART_MAX_POINTS:
        vectors = cotangent_summed_apart(vectors)
    rows = []
    for i in range(linear.shape[0]):
        row = vectors[..., 0] * linear[i, 0]
        for k in range(1, d):
            row = row + vectors[..., k] * linear[i, k]
        rows.append(row if offset is None else row + offset[i])
    return (np if host else jnp).stack(rows, axis=-1)


def apply_affine(affine, points):
    """Points ``(..., d)`` through a homogeneous ``(d+1, d+1)`` matrix."""
    ndim = affine.shape[-1] - 1
    return apply_linear(affine[:ndim, :ndim], points, affine[:ndim, ndim])


@jax.tree_util.register_pytree_node_class
class Image:
    """Image data with its voxel-to-world matrix.

    ``data`` is ``(*spatial)`` for a scalar image or ``(*spatial, C)`` channels-last; the
    spatial rank is that of ``affine`` (``(d+1, d+1)``).
    """

    def __init__(self, data, affine=None, *, ndim: int | None = None):
        data_ndim = jnp.ndim(data)
        if affine is None:
            ndim = data_ndim if ndim is None else ndim
            affine = identity_affine(ndim)
        else:
            if isinstance(affine, (list, tuple)) or (
                isinstance(affine, np.ndarray) and affine.dtype != np.float32
            ):
                affine = np.asarray(affine, dtype=np.float32)
            ndim = jnp.shape(affine)[-1] - 1
        _check_affine(affine, ndim)
        _checks.spatial_rank_of(data_ndim, ndim, name="image data")
        _checks.check_not_empty(data, name="image data")
        self.data = data
        self.affine = affine

    def tree_flatten(self):
        return (self.data, self.affine), None

    @classmethod
    def tree_unflatten(cls, _, children):
        image = object.__new__(cls)
        image.data, image.affine = children
        return image

    @property
    def ndim(self) -> int:
        """Spatial rank (channels excluded)."""
        return jnp.shape(self.affine)[-1] - 1

    @property
    def has_channels(self) -> bool:
        return jnp.ndim(self.data) == self.ndim + 1

    @property
    def grid(self) -> Grid:
        return Grid.tree_unflatten(tuple(jnp.shape(self.data)[: self.ndim]), (self.affine,))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jnp.shape(self.data))

    def with_data(self, data) -> "Image":
        """The same placement in space, new voxel values."""
        return Image(data, self.affine)

    def __repr__(self) -> str:
        return f"Image(shape={self.shape}, dtype={jnp.result_type(self.data)}, grid={self.grid!r})"


def as_image(x, *, ndim: int | None = None) -> Image:
    """Wrap a plain array as an :class:`Image` with the identity matrix (pass images through).

    A plain array is taken as a scalar image unless ``ndim`` says how many of its axes
    are spatial (the rest is one channel axis).
    """
    if isinstance(x, Image):
        return x
    return Image(x, ndim=ndim)
