"""Spatial transforms: pytrees that map world points ``(..., d)`` to world points.

The contract every transform meets (checked for the dense ones over ``_transform_cases`` by
``tests/test_transforms.py::test_dense_transforms_jit_vmap_grad``):

- ``t(points)`` maps world points to world points, any leading shape;
- ``t.mapped_points(grid)`` is ``t(grid.points())``, possibly computed faster;
- ``t.ndim`` is the spatial rank;
- it is a pytree whose leaves are arrays, so it passes through ``jit``, ``vmap``, ``grad``.

Registration maps the fixed image's space into the moving image's: ``warp(moving, t,
fixed_grid)`` reads ``moving`` at ``t(x)`` for every voxel ``x`` of the fixed grid.
``compose(f, g)`` is ``x -> f(g(x))``: an affine ``A`` followed by a deformable
refinement ``D`` defined in fixed space is ``compose(A, D)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg import _checks, differential
from jaxreg.grid import PRECISE, Grid, Image, _inverse, apply_affine, apply_linear, as_image, precise_matmul
from jaxreg.sampling import _taps, sample

__all__ = [
    "Transform",
    "Affine",
    "Displacement",
    "Velocity",
    "BSpline",
    "KernelTransform",
    "Compose",
    "compose",
    "invert",
    "jacobian_determinant",
    "warp",
    "affine_param_count",
    "rotation_matrix",
    "wendland",
    "AFFINE_KINDS",
]


class Transform:
    """Base contract. Subclasses list their array fields in ``_leaves`` and their static
    (hashable, shape-defining) fields in ``_static``; both become the pytree structure."""

    _leaves: tuple[str, ...] = ()
    _static: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node_class(cls)

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in self._leaves), tuple(getattr(self, n) for n in self._static)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        # Bypasses __init__: JAX rebuilds pytrees with placeholder leaves that
        # validation would reject.
        obj = object.__new__(cls)
        for name, value in zip(cls._leaves, leaves):
            setattr(obj, name, value)
        for name, value in zip(cls._static, static):
            setattr(obj, name, value)
        return obj

    @property
    def ndim(self) -> int:
        raise NotImplementedError

    def __call__(self, points):
        raise NotImplementedError

    def mapped_points(self, grid: Grid):
        """``self(grid.points())``: where each voxel centre of ``grid`` goes, ``(*shape, d)``."""
        return self(grid.points())

    def _check(self, points):
        _checks.check_points(points, self.ndim, name="points")


# ----------------------------------------------------------------------------- affine

AFFINE_KINDS = ("translation", "rigid", "similarity", "affine")


def affine_param_count(kind: str, ndim: int) -> int:
    """Number of parameters of an affine parametrization in ``ndim`` dimensions."""
    rotations = ndim * (ndim - 1) // 2
    counts = {
        "translation": ndim,
        "rigid": rotations + ndim,
        "similarity": rotations + 1 + ndim,
        "affine": ndim * ndim + ndim,
    }
    if kind not in counts:
        raise ValueError(f"unknown affine kind {kind!r}; expected one of {AFFINE_KINDS}")
    return counts[kind]


def rotation_matrix(rotation, ndim: int):
    """Rotation from ``ndim*(ndim-1)/2`` parameters: the exponential of a skew matrix.

    In 2-D the parameter is the angle (radians, counter-clockwise from axis 0 to axis 1);
    in 3-D it is the rotation vector (axis times angle). The same formula serves both.
    """
    rotation = jnp.asarray(rotation)
    rows, cols = np.triu_indices(ndim, k=1)
    if rotation.shape != (len(rows),):
        raise ValueError(f"a {ndim}-D rotation takes {len(rows)} parameters; got shape {rotation.shape}")
    if ndim == 3:
        # Order the 3-D generators so that the parameters form the usual rotation vector.
        rotation = jnp.stack([rotation[2], -rotation[1], rotation[0]])
    skew = jnp.zeros((ndim, ndim), rotation.dtype).at[rows, cols].set(-rotation)
    skew = skew - skew.T
    return jax.scipy.linalg.expm(skew)


class Affine(Transform):
    """``x -> A x + b`` held as a homogeneous ``(d+1, d+1)`` matrix."""

    _leaves = ("matrix",)

    def __init__(self, matrix):
        matrix = jnp.asarray(matrix, dtype=jnp.promote_types(jnp.result_type(matrix), jnp.float32))
        shape = matrix.shape
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
            raise ValueError(f"an affine matrix must be (d+1, d+1); got shape {shape}")
        self.matrix = matrix

    @classmethod
    def identity(cls, ndim: int) -> "Affine":
        return cls(np.eye(ndim + 1, dtype=np.float32))  # numpy: no program to compile

    @classmethod
    def from_linear(cls, linear, translation=None) -> "Affine":
        linear = jnp.asarray(linear, jnp.float32)
        ndim = linear.shape[0]
        translation = jnp.zeros(ndim) if translation is None else jnp.asarray(translation, jnp.float32)
        top = jnp.concatenate([linear, translation[:, None]], axis=1)
        bottom = jnp.concatenate([jnp.zeros((1, ndim)), jnp.ones((1, 1))], axis=1)
        return cls(jnp.concatenate([top, bottom], axis=0))

    @classmethod
    def from_params(cls, params, *, kind: str, ndim: int, center=None) -> "Affine":
        """Build from a flat parameter vector; all-zero parameters give the identity.

        Layouts (``r`` rotation parameters, see :func:`rotation_matrix`; ``t`` translation):
        translation ``[t]``, rigid ``[r, t]``, similarity ``[r, log_scale, t]``, affine
        ``[M (row-major d*d), t]`` with linear part ``I + M``. The linear part acts about
        ``center`` (world), so rotating about an image's centre does not move it away.
        """
        params = jnp.asarray(params)
        expected = affine_param_count(kind, ndim)
        if params.shape != (expected,):
            raise ValueError(f"{kind} in {ndim}-D takes {expected} parameters; got shape {params.shape}")
        rotations = ndim * (ndim - 1) // 2
        translation = params[-ndim:]
        if kind == "translation":
            linear = jnp.eye(ndim, dtype=params.dtype)
        elif kind == "rigid":
            linear = rotation_matrix(params[:rotations], ndim)
        elif kind == "similarity":
            linear = jnp.exp(params[rotations]) * rotation_matrix(params[:rotations], ndim)
        else:
            linear = jnp.eye(ndim, dtype=params.dtype) + params[: ndim * ndim].reshape(ndim, ndim)
        if center is not None:
            center = jnp.asarray(center, params.dtype)
            translation = translation + center - precise_matmul(linear, center)
        return cls.from_linear(linear, translation)

    @property
    def ndim(self) -> int:
        return self.matrix.shape[0] - 1

    @property
    def linear(self):
        return self.matrix[: self.ndim, : self.ndim]

    @property
    def translation(self):
        return self.matrix[: self.ndim, self.ndim]

    def __call__(self, points):
        self._check(points)
        return apply_affine(self.matrix, points)

    def inverse(self) -> "Affine":
        return Affine(jnp.linalg.inv(self.matrix))

    def __matmul__(self, other: "Affine") -> "Affine":
        """Matrix product: ``(a @ b)(x) == a(b(x))``."""
        return Affine(precise_matmul(self.matrix, other.matrix))


# ------------------------------------------------------------------------ dense fields


def _index_displacement(field_mm, affine):
    """Displacements in mm -> displacements in index units of the grid they live on."""
    ndim = field_mm.shape[-1]
    inverse_linear = jnp.linalg.inv(jnp.asarray(affine, jnp.float32)[:ndim, :ndim])
    return apply_linear(inverse_linear, field_mm)


class _FieldOnGrid(Transform):
    """A transform stored as an array ``(*shape, d)`` on the grid that ``affine`` describes."""

    _array = "field"

    @property
    def ndim(self) -> int:
        return getattr(self, self._array).shape[-1]

    @property
    def grid(self) -> Grid:
        return Grid.tree_unflatten(getattr(self, self._array).shape[:-1], (self.affine,))

    def _is_own_grid(self, grid: Grid) -> bool:
        # On its own grid a field needs no interpolation. Equality is knowable only for
        # concrete matrices (plain arrays all carry identity matrices, each its own
        # object); a traced matrix counts only when it is the very same object.
        if grid.shape != self.grid.shape:
            return False
        if grid.affine is self.affine:
            return True
        return isinstance(grid.affine, np.ndarray) and isinstance(self.affine, np.ndarray) and np.array_equal(grid.affine, self.affine)


class Displacement(_FieldOnGrid):
    """``x -> x + u(x)`` with ``u`` a field ``(*shape, d)`` in world units on a grid.

    ``affine`` is that grid's voxel-to-world matrix. Between voxels ``u`` is linearly
    interpolated; beyond the grid it keeps its edge value.
    """

    _leaves = ("field", "affine")

    def __init__(self, field, affine=None):
        field = jnp.asarray(field)
        _checks.check_field(field, name="displacement field")
        grid = Grid(field.shape[:-1], affine)
        self.field = field
        self.affine = grid.affine

    @classmethod
    def zeros(cls, grid: Grid) -> "Displacement":
        return cls(jnp.zeros(grid.shape + (grid.ndim,), jnp.float32), grid.affine)

    @classmethod
    def from_transform(cls, transform: Transform, grid: Grid) -> "Displacement":
        """Sample any transform on ``grid`` into a dense field."""
        return cls(transform.mapped_points(grid) - grid.points(), grid.affine)

    def displacement_at(self, points):
        return sample(self.field, self.grid.world_to_index(points), order=1, mode="nearest")

    def __call__(self, points):
        self._check(points)
        return points + self.displacement_at(points)

    def mapped_points(self, grid: Grid):
        if self._is_own_grid(grid):
            return grid.points() + self.field
        return self(grid.points())


def _scaling_and_squaring(index_field, steps: int):
    """exp of a stationary velocity field given in index units, on its own grid."""
    identity = Grid(index_field.shape[:-1]).index_points()

    def square(_, u):
        return u + sample(u, identity + u, order=1, mode="nearest")

    # A loop, not an unrolled chain: each squaring reads the previous one from memory,
    # where an unrolled chain would be fused and recomputed (see jaxreg.sampling).
    return jax.lax.fori_loop(0, steps, square, index_field / (2.0**steps))


class Velocity(_FieldOnGrid):
    """Stationary velocity field ``v`` ``(*shape, d)`` in world units; the transform is
    ``exp(v)``, computed by scaling and squaring with ``steps`` squarings.

    Diffeomorphic for smooth ``v``; the exact inverse is ``exp(-v)``.
    """

    _leaves = ("field", "affine")
    _static = ("steps",)

    def __init__(self, field, affine=None, *, steps: int = 7):
        field = jnp.asarray(field)
        _checks.check_field(field, name="velocity field")
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        self.field = field
        self.affine = Grid(field.shape[:-1], affine).affine
        self.steps = int(steps)

    def exp(self) -> Displacement:
        """The displacement field of ``exp(v)`` on the velocity's grid."""
        index_field = _index_displacement(self.field, self.affine)
        u = _scaling_and_squaring(index_field, self.steps)
        linear = jnp.asarray(self.affine, jnp.float32)[: self.ndim, : self.ndim]
        return Displacement(apply_linear(linear, u), self.affine)

    def inverse(self) -> "Velocity":
        return Velocity(-self.field, self.affine, steps=self.steps)

    def __call__(self, points):
        self._check(points)
        return self.exp()(points)

    def mapped_points(self, grid: Grid):
        displacement = self.exp()
        if self._is_own_grid(grid):
            return grid.points() + displacement.field
        return displacement(grid.points())


# ------------------------------------------------------------------------------ B-spline


class BSpline(_FieldOnGrid):
    """Cubic B-spline free-form deformation: ``x -> x + sum_j c_j beta3((x - p_j)/h)``.

    ``coefficients`` ``(*control_shape, d)`` are displacements in world units at control
    points ``p_j`` of the control grid ``affine``. Build one that covers an image with
    :meth:`BSpline.zeros`.
    """

    _leaves = ("coefficients", "affine")
    _array = "coefficients"

    def __init__(self, coefficients, affine=None):
        coefficients = jnp.asarray(coefficients)
        _checks.check_field(coefficients, name="B-spline coefficients")
        self.coefficients = coefficients
        self.affine = Grid(coefficients.shape[:-1], affine).affine

    @classmethod
    def control_grid(cls, grid: Grid, spacing) -> Grid:
        """Control points every ``spacing`` mm along each axis of ``grid``, one beyond
        each end, so that the cubic support covers every voxel of ``grid``."""
        spacing = _checks.per_axis(spacing, grid.ndim, name="control point spacing")
        _checks.check_positive(spacing, name="control point spacing")
        voxel = np.asarray(grid.spacing, dtype=np.float64)
        step = np.asarray(spacing) / voxel  # in voxels of grid
        shape = tuple(int(math.ceil((n - 1) / s)) + 3 for n, s in zip(grid.shape, step))
        scale = np.eye(grid.ndim + 1)
        scale[: grid.ndim, : grid.ndim] = np.diag(step)
        scale[: grid.ndim, grid.ndim] = -step
        return Grid(shape, np.asarray(grid.affine, np.float64) @ scale)

    @classmethod
    def zeros(cls, grid: Grid, spacing) -> "BSpline":
        control = cls.control_grid(grid, spacing)
        return cls(jnp.zeros(control.shape + (grid.ndim,), jnp.float32), control.affine)

    def __call__(self, points):
        self._check(points)
        index = self.grid.world_to_index(points)
        return points + sample(self.coefficients, index, order=3, mode="constant", prefilter=False)

    def mapped_points(self, grid: Grid):
        if _axes_parallel(self.affine, grid.affine):
            return grid.points() + self.on_parallel_grid(grid).field
        return self(grid.points())

    def on_parallel_grid(self, grid: Grid) -> Displacement:
        """The displacement on ``grid`` as a :class:`Displacement`, for a ``grid`` whose axes
        run along the control grid's (as the grid the control points were laid on, and its
        pyramid levels, do; this is not checked, since the matrices may be traced).

        Along such axes the spline is separable: the field is the coefficients multiplied
        by one small 1-D basis matrix per axis, ``(voxels, control points)``. A few
        matrix products replace 4^d gathered taps per voxel (and their gradient, 4^d
        scatter-adds), and are exact to float32 rounding.
        """
        d = self.ndim
        if grid.ndim != d:
            raise ValueError(f"a {d}-D B-spline cannot be evaluated on a {grid.ndim}-D grid")
        to_control = precise_matmul(_inverse(self.affine), jnp.asarray(grid.affine, jnp.float32))
        field = self.coefficients
        for axis in range(d):  # contract control axis `axis` into voxel axis `axis`
            index = to_control[axis, axis] * jnp.arange(grid.shape[axis], dtype=jnp.float32) + to_control[axis, d]
            # The sampler's own cubic taps, as rows of a dense basis matrix; a tap beyond the
            # control grid falls out of one_hot, as sample's mode="constant" reads 0 there.
            base, offsets, weights, _ = _taps(index, 3)
            basis = sum(w[:, None] * jax.nn.one_hot(base + o, field.shape[axis], dtype=w.dtype) for o, w in zip(offsets, weights))
            field = jnp.moveaxis(jnp.tensordot(basis, field, axes=((1,), (axis,)), precision=PRECISE), 0, axis)
        return Displacement(field, grid.affine)


def _axes_parallel(control_affine, grid_affine) -> bool:
    """Whether each axis of ``grid`` runs along the same axis of the control grid, known
    only for concrete matrices (a traced one gives False: the per-point path is taken)."""
    if isinstance(control_affine, jax.core.Tracer) or isinstance(grid_affine, jax.core.Tracer):
        return False
    to_control = np.linalg.inv(np.asarray(control_affine, np.float64)) @ np.asarray(grid_affine, np.float64)
    d = to_control.shape[0] - 1
    linear = to_control[:d, :d]
    return bool(np.all(np.abs(linear - np.diag(np.diag(linear))) <= 1e-6 * np.max(np.abs(linear))))


# ------------------------------------------------------------------------ kernel (RBF)


def wendland(r):
    """Wendland's compactly supported C2 function ``(1 - r)^4 (4 r + 1)`` for ``r < 1``."""
    s = jnp.clip(1.0 - r, 0.0, None)
    return s**4 * (4.0 * r + 1.0)


def _safe_norm(x):
    squared = jnp.sum(x * x, axis=-1)
    positive = squared > 0
    # The norm's derivative is undefined at 0; Wendland's is 0 there, so pass 0.
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


class KernelTransform(Transform):
    """``x -> A(x) + sum_i w_i psi(|x - c_i| / sigma)`` with Wendland's kernel ``psi``.

    ``centers`` ``(M, d)``, ``weights`` ``(M, d)`` world units, ``sigma`` the support
    radius (mm), ``affine`` an :class:`Affine` part (identity by default). Fit one that
    takes landmarks exactly onto landmarks with :meth:`KernelTransform.fit`.
    """

    _leaves = ("centers", "weights", "sigma", "affine")

    def __init__(self, centers, weights, sigma, affine: Affine | None = None):
        centers = jnp.asarray(centers, jnp.float32)
        weights = jnp.asarray(weights, jnp.float32)
        if centers.ndim != 2 or weights.shape != centers.shape:
            raise ValueError(
                f"centers and weights must both be (M, d); got {centers.shape} and {weights.shape}"
            )
        _checks.check_positive(sigma, name="sigma")
        self.centers = centers
        self.weights = weights
        self.sigma = jnp.asarray(sigma, jnp.float32)
        self.affine = Affine.identity(centers.shape[1]) if affine is None else affine

    @classmethod
    def fit(cls, source, target, *, sigma, regularization: float = 0.0, with_affine: bool = True):
        """The kernel transform with ``t(source_i) == target_i`` (exactly when
        ``regularization`` is 0), with an affine part when ``with_affine``."""
        source = jnp.asarray(source, jnp.float32)
        target = jnp.asarray(target, jnp.float32)
        _checks.check_same_shape(source, target, names=("source", "target"))
        m, d = source.shape
        kernel = wendland(_safe_norm(source[:, None, :] - source[None, :, :]) / sigma)
        kernel = kernel + regularization * jnp.eye(m)
        if with_affine:
            if m < d + 1:
                raise ValueError(f"an affine part needs at least {d + 1} landmarks in {d}-D; got {m}")
            basis = jnp.concatenate([source, jnp.ones((m, 1))], axis=1)
            system = jnp.block([[kernel, basis], [basis.T, jnp.zeros((d + 1, d + 1))]])
            rhs = jnp.concatenate([target, jnp.zeros((d + 1, d))], axis=0)
            solution = jnp.linalg.solve(system, rhs)
            weights, affine_rows = solution[:m], solution[m:]
            affine = Affine.from_linear(affine_rows[:d].T, affine_rows[d])
        else:
            weights = jnp.linalg.solve(kernel, target - source)
            affine = None
        return cls(source, weights, sigma, affine)

    @property
    def ndim(self) -> int:
        return self.centers.shape[1]

    def __call__(self, points):
        self._check(points)
        lead = points.shape[:-1]
        flat = points.reshape(-1, self.ndim)
        radial = wendland(_safe_norm(flat[:, None, :] - self.centers[None, :, :]) / self.sigma)
        moved = self.affine(flat) + precise_matmul(radial, self.weights)
        return moved.reshape(lead + (self.ndim,))


# ---------------------------------------------------------------------------- compose


class Compose(Transform):
    """``x -> transforms[0](transforms[1](... transforms[-1](x)))``."""

    _leaves = ("transforms",)

    def __init__(self, transforms: Sequence[Transform]):
        transforms = tuple(transforms)
        if not transforms:
            raise ValueError("compose needs at least one transform")
        ranks = {t.ndim for t in transforms}
        if len(ranks) != 1:
            raise ValueError(f"cannot compose transforms of different ranks {sorted(ranks)}")
        self.transforms = transforms

    @property
    def ndim(self) -> int:
        return self.transforms[0].ndim

    def __call__(self, points):
        for t in reversed(self.transforms):
            points = t(points)
        return points

    def mapped_points(self, grid: Grid):
        # The innermost transform sees the grid itself and may use its fast path.
        points = self.transforms[-1].mapped_points(grid)
        for t in reversed(self.transforms[:-1]):
            points = t(points)
        return points


def compose(*transforms: Transform) -> Transform:
    """``compose(f, g)(x) == f(g(x))``; affines are multiplied into one matrix."""
    flat: list[Transform] = []
    for t in transforms:
        flat.extend(t.transforms if isinstance(t, Compose) else (t,))
    merged: list[Transform] = []
    for t in flat:
        if merged and isinstance(t, Affine) and isinstance(merged[-1], Affine):
            merged[-1] = merged[-1] @ t
        else:
            merged.append(t)
    return merged[0] if len(merged) == 1 else Compose(merged)


# ----------------------------------------------------------------------------- inverse


def invert(transform: Transform, *, grid: Grid | None = None, iterations: int = 20) -> Transform:
    """Inverse of a transform.

    Exact for :class:`Affine` and :class:`Velocity` (``exp(-v)``); a composition is
    inverted factor by factor. Any other transform is inverted numerically on ``grid``
    (default: a :class:`Displacement`'s own grid) by the fixed-point iteration
    ``y -> y - (t(y') - y')``, giving a :class:`Displacement`; it converges where the
    transform's displacement has a Jacobian of norm below 1.
    """
    if isinstance(transform, Affine):
        return transform.inverse()
    if isinstance(transform, Velocity):
        return transform.inverse()
    if isinstance(transform, Compose):
        return compose(*(invert(t, grid=grid, iterations=iterations) for t in reversed(transform.transforms)))
    if grid is None:
        if not isinstance(transform, Displacement):
            raise ValueError(f"inverting a {type(transform).__name__} numerically needs a grid=")
        grid = transform.grid
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    targets = grid.points()
    # A float64 transform (under jax_enable_x64) maps float32 points to float64 ones: the
    # loop carries what the transform returns.
    targets = targets.astype(jax.eval_shape(transform, targets).dtype)

    def step(_, inverse_points):
        return inverse_points - (transform(inverse_points) - targets)

    inverse_points = jax.lax.fori_loop(0, iterations, step, targets)
    return Displacement(inverse_points - targets, grid.affine)


# ------------------------------------------------------------------------- diagnostics


def jacobian_determinant(transform: Transform, grid: Grid):
    """``det(d t / d x)`` at every voxel of ``grid`` (central differences in world units)."""
    return differential.jacobian_determinant_of_map(transform.mapped_points(grid), grid)


# -------------------------------------------------------------------------------- warp


def warp(image, transform: Transform, target_grid: Grid | None = None, *, order: int = 1, mode: str = "constant", cval: float = 0.0):
    """Resample ``image`` onto ``target_grid`` through ``transform``.

    The value at voxel ``x`` of ``target_grid`` is ``image`` read at world point
    ``transform(x)``. ``image`` is an :class:`~jaxreg.grid.Image` (returns an Image on the
    target grid) or a plain array with the identity matrix (returns an array);
    ``target_grid`` defaults to the image's own grid. Use ``order=0`` for label maps.
    """
    source = as_image(image, ndim=transform.ndim)
    if source.ndim != transform.ndim:
        raise ValueError(f"cannot warp a {source.ndim}-D image with a {transform.ndim}-D transform")
    grid = source.grid if target_grid is None else target_grid
    if grid.ndim != transform.ndim:
        raise ValueError(f"target grid is {grid.ndim}-D, transform is {transform.ndim}-D")
    index = source.grid.world_to_index(transform.mapped_points(grid))
    values = sample(source.data, index, order=order, mode=mode, cval=cval)
    if isinstance(image, Image):
        return Image(values, grid.affine)
    return values
